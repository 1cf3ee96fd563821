"""The training op on an empty batch (N = 0), for every backend.

Eager torchvision takes a batch of no images (uneven data splits, detection
batches without boxes): the convs return empty tensors, and
nn.BatchNorm2d's forward adds 1 to num_batches_tracked (the block does
that, as for any batch) while ATen's batch norm leaves the running
statistics unchanged (at::_batch_norm_impl_index returns early for an
empty input); the gradients are empty for x and zero for every weight.
No kernel runs here: there is nothing to compute.

With a multi-process exchange (SyncBatchNorm), an empty rank still takes
part in every collective the other ranks issue, in the same order and with
the same sizes, as nn.SyncBatchNorm's empty rank does
(torch/nn/modules/_functions.py): forward, it all-gathers a row of count 0
(mean and M2 zero, which add nothing to the merge) for each finalize point
and takes the group's statistics for its running-stat update, as the other
ranks do; backward, it all-reduces zero gradient sums (float64, as both
backends send them). So no rank raises or waits for it.
"""

import torch

from ..common.batch_stats import LOCAL, SAVED_ROWS, StatisticsRows, norm_columns, stats_dtype, synchronized_statistics
from ..common.layout import output_memory_format
from ..common.sizes import conv_output_size


def finalize_points(projection):
    """The norms finalized together, in the order the backends' forward
    exchanges them (bn1; bn2; bn3 with bn_d); backward reduces them in
    reverse order."""
    return [[0], [1], [2, 3] if projection else [2]]


def _empty_rows(channels, device):
    zeros = torch.zeros(1, channels, dtype=torch.float64, device=device)
    return StatisticsRows(torch.zeros(1, dtype=torch.float64, device=device), zeros, zeros.clone())


def empty_batch_forward(x, w1, w2, w3, wd, norms, stride, exchange=LOCAL):
    """The training op's outputs (out, y1, y2, y3, yd, bn_stats, new_running)
    for x with N = 0 (module docstring): empty activations in the shapes and
    memory formats the backends give; new_running the running statistics
    unchanged (a copy), or with an exchange the group's update; bn_stats
    (never read by a backward of an empty batch) the group's mean and invstd
    where exchanged, else 0; new_running of a norm without running
    statistics (the batch's, which the block ignores) NaN, as eager's
    var_mean of no values."""
    _, _, h, w = x.shape
    width, cout = w1.shape[0], w3.shape[0]
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    cols = norm_columns(width, cout, wd is not None)
    sd = stats_dtype(x.dtype)
    bn_stats = torch.zeros((SAVED_ROWS, cols[-1].stop), dtype=sd, device=x.device)
    new_running = torch.full((2, cols[-1].stop), float("nan"), dtype=sd, device=x.device)
    for indices in finalize_points(wd is not None):
        synced = [i for i in indices if norms[i].batch_stats]
        gathered = {}
        if synced and exchange is not LOCAL:
            rows = exchange.gather_statistics([_empty_rows(cols[i].stop - cols[i].start, x.device) for i in synced])
            gathered = dict(zip(synced, rows))
        for i in indices:
            bn, col = norms[i], cols[i]
            if i in gathered and float(gathered[i].count.sum()) > 0:
                mean, var, new_running[0, col], new_running[1, col] = synchronized_statistics(gathered[i], bn, sd)
                bn_stats[0, col], bn_stats[1, col] = mean, torch.rsqrt(var + bn.eps).to(sd)
            elif bn.running_mean is not None:  # unchanged, as ATen's batch norm leaves them
                new_running[0, col], new_running[1, col] = bn.running_mean, bn.running_var
    act = dict(dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    yd = torch.empty((0, cout, ho, wo), **act) if wd is not None else x.new_empty(0)
    return (torch.empty((0, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)),
            torch.empty((0, width, h, w), **act), torch.empty((0, width, ho, wo), **act),
            torch.empty((0, cout, ho, wo), **act), yd, bn_stats, new_running)


def empty_batch_backward(x, w1, w2, w3, wd, bn_stats, batch_stats, need_x_grad, exchange=LOCAL):
    """The training backward op's outputs (dx, dw1, dw2, dw3, dwd, grad_bn)
    for x with N = 0: dx empty (channels_last, as the backends give it; an
    empty tensor of shape [0] unless need_x_grad), the weights' and BN
    parameters' gradients zero; with an exchange, the zero gradient sums of
    each reduction point cross it (module docstring)."""
    width, cout = w1.shape[0], w3.shape[0]
    cols = norm_columns(width, cout, wd is not None)
    if exchange is not LOCAL:
        for indices in reversed(finalize_points(wd is not None)):
            if any(batch_stats[i] for i in indices):
                c = cols[indices[0]].stop - cols[indices[0]].start
                exchange.reduce_gradient_sums(torch.zeros(1 + len(indices), c, dtype=torch.float64, device=x.device),
                                              0)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) if need_x_grad \
        else x.new_empty(0)
    dwd = torch.zeros_like(wd) if wd is not None else x.new_empty(0)
    return (dx, torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3), dwd,
            bn_stats.new_zeros((2, bn_stats.shape[1])))


__all__ = ["empty_batch_backward", "empty_batch_forward", "finalize_points"]
