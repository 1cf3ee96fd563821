"""Per-channel batch statistics of the training op, and the seam where a
multi-GPU (SyncBatchNorm) exchange goes in.

Forward. Every conv of the fused training path writes, in its epilogue,
*partial* statistics of its raw output y (rounded to the activation dtype,
as eager computes them): one row per producer (a tile of output pixels),

    StatisticsRows(count [R], mean [R, C], m2 [R, C])   all float64,

with m2 the sum of squared deviations from the row's own mean. The
finalize merges the rows in a fixed order (no atomics, so deterministic):

    n = sum_r count_r
    mean = sum_r count_r * mean_r / n
    M2 = sum_r (m2_r + count_r * (mean_r - mean)^2)        (exact: the parallel-axis rule)
    var = M2 / n (normalizes), M2 / (n - 1) (running_var)

Backward. BN's backward needs two per-channel reductions over all pixels,
GradientSums [J, C] float64: (sum dz, sum dz * xhat), with dz the gradient
at BN's output and xhat = (y - mean) * invstd. They are also BN's bias and
weight gradients. They are accumulated in float64: BN's backward applies
sum/n to every element, so an fp32 cancellation error would shift a whole
channel's gradient and the next norm's sums would multiply it by n.

The seam (issue 12, SyncBatchNorm): both backends pass every per-channel
vector that nn.SyncBatchNorm exchanges through one StatisticsExchange.
Forward, between the conv(s) whose norms are finalized at one point of the
block (bn1; bn2; bn3 together with bn_d) and their finalize:
``exchange.gather_statistics([rows, ...])``. Backward, between each
reduction (the tail's sums for bn3 and bn_d together; bn2; bn1) and BN's
backward coefficients: ``exchange.reduce_gradient_sums(sums, count)``.
LOCAL, the identity, is the one-process exchange;
common/process_group_exchange.py's ProcessGroupExchange is the
torch.distributed one (one all_gather per gather, one all_reduce per
reduction). The count the backward coefficients divide by is the
finalize's n in forward, and the count the exchange returns in backward:
with several processes, the group's total. See docs/training.md, "Multi-GPU
training (SyncBatchNorm)".
"""

import itertools
import typing

import torch

from .sizes import conv_output_size


class BatchNormArgs(typing.NamedTuple):
    """One BatchNorm of the block as the training op sees it.

    weight, bias: the affine parameters (None for affine=False);
    running_mean, running_var: the running statistics (None without them);
    batch_stats: normalize with the batch's statistics (train mode, or no
    running stats) rather than the running ones; momentum: the exponential
    average factor of this step's running-stat update (nn.BatchNorm2d's:
    `momentum`, or 1/num_batches_tracked when momentum is None); eps.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    batch_stats: bool
    momentum: float
    eps: float


# Per-channel statistics of the norms, their channels side by side
# (norm_columns). The backends work with a block of STATS_ROWS rows per
# channel: mean, invstd, scale = gamma * invstd, beta (bias or 0) and n (values
# per channel); BatchNorm's output is (y - mean) * scale + beta. The op saves
# for backward only the first SAVED_ROWS (mean, invstd: what eager's batch
# norm saves too); the backward rebuilds the others from the affine
# parameters and the shapes (restore).
STATS_ROWS = 5
MEAN, INVSTD, SCALE, BETA, COUNT = range(STATS_ROWS)
SAVED_ROWS = 2


def norm_counts(x_shape, stride, n_norms):
    """n, the values per channel of each norm in this process: N*H*W for
    bn1, N*Ho*Wo for the others (a multi-process exchange sums them over
    the group in backward, StatisticsExchange.reduce_gradient_sums)."""
    n, _, h, w = x_shape
    out = n * conv_output_size(h, stride) * conv_output_size(w, stride)
    return [n * h * w] + [out] * (n_norms - 1)


def stats_dtype(dtype):
    """The dtype of the per-channel statistics for activations of `dtype`:
    float64 for float64 (the reference backend, gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_columns(width, cout, projection):
    """The column slices of bn1, bn2, bn3 (and bn_d) in bn_stats and in the
    op's other per-channel outputs (running stats, BN gradients)."""
    bounds = [0, width, 2 * width, 2 * width + cout] + ([2 * width + 2 * cout] if projection else [])
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


class StatisticsRows(typing.NamedTuple):
    """Partial per-channel statistics, one row per producer (see module docstring)."""

    count: torch.Tensor  # [R] float64: values in the row
    mean: torch.Tensor  # [R, C] float64: the row's mean per channel
    m2: torch.Tensor  # [R, C] float64: sum of squared deviations from the row's mean


def merge_rows(rows):
    """The rows merged into one (R = 1) by the formula of the module
    docstring, in float64: what a multi-process exchange contributes per
    rank. (The Triton finalize merges the same way in-kernel.)"""
    count, mean_r, m2_r = rows.count.double(), rows.mean.double(), rows.m2.double()
    n = count.sum()
    # An empty batch (n = 0: a rank of a process group with no images) merges
    # to count 0, mean 0 and M2 0, as nn.SyncBatchNorm's empty rank sends
    # zeros: its row then adds nothing to another rank's merge.
    mean = (count[:, None] * mean_r).sum(0) / n.clamp_min(1.0)
    m2 = (m2_r + count[:, None] * (mean_r - mean) ** 2).sum(0)
    return StatisticsRows(n.reshape(1), mean[None], m2[None])


def synchronized_statistics(rows, bn, dtype):
    """A batch-statistics norm's statistics from the exchanged StatisticsRows
    `rows` (one row per rank), as nn.SyncBatchNorm computes them: (mean,
    biased var, new running mean, new running var), in `dtype`
    (stats_dtype) but the variance in float64, merged in float64
    (merge_rows). The running statistics
    become (1 - m) * old + m * batch with the unbiased variance; without
    running statistics the batch mean and unbiased variance."""
    merged = merge_rows(rows)
    n = merged.count[0]
    mean, var = merged.mean[0].to(dtype), merged.m2[0] / n
    unbiased = (merged.m2[0] / (n - 1)).to(dtype)
    if bn.running_mean is None:
        return mean, var, mean, unbiased
    m = bn.momentum
    return (mean, var, (1 - m) * bn.running_mean.to(dtype) + m * mean,
            (1 - m) * bn.running_var.to(dtype) + m * unbiased)


class StatisticsExchange:
    """Where per-channel statistics cross processes. The base class is the
    identity: one process, nothing exchanged (LOCAL)."""

    def gather_statistics(self, rows):
        """Forward: this process's StatisticsRows of the norms finalized at
        one point of the block (a list: [bn1], [bn2], or [bn3, bn_d]) -> the
        rows to finalize, one StatisticsRows per norm in the same order (a
        multi-process exchange: one row per rank)."""
        return list(rows)

    def reduce_gradient_sums(self, sums, count):
        """Backward: this process's GradientSums [J, C] float64 of norms
        sharing `count` (an int: values per channel in this process) ->
        (sums, count) over the exchange's processes. The count comes back
        as given when nothing is exchanged, else as a 0-d float64 tensor on
        the sums' device (the group's total: counts may differ between
        ranks)."""
        return sums, count


LOCAL = StatisticsExchange()
