"""Per-channel BatchNorm kernels of the training path: the forward finalize
(statistics rows -> mean, invstd, scale, the running-stat update), the
backward's restore of a norm's statistics block from what the op saved, the
fixed-order sum of backward partial rows (fp64), and BN's backward
coefficients.

Everything is per channel (tiny next to the convs): statistics rows and
gradient sums in fp64, what the other kernels read in fp32. Rows are
merged in a fixed order (common/batch_stats.py's formula: chunks of BLOCK_R
rows summed by tl.sum, chunks in sequence), so two identical calls give
bitwise-identical results; nothing uses atomics.

The per-norm statistics block ("stats", [STATS_ROWS, C] fp32, one slice of
the op's bn_stats; common/batch_stats.py) holds, per channel:
    row 0 mean, row 1 invstd, row 2 scale = gamma * invstd (invstd without
    affine weight), row 3 beta (BN's bias, or 0), row 4 n (values per channel).
BatchNorm's output is (y - mean) * scale + beta. The kernels of this room
index these rows by number.
"""

import triton
import triton.language as tl

from ...common.sizes import cdiv
from ._bn import store_bn
from ._common import interpreting, launch_fixed


@triton.jit
def _finalize_kernel(
    count_ptr, rmean_ptr, rm2_ptr, R,
    weight_ptr, bias_ptr, run_mean_ptr, run_var_ptr, stats_ptr, saved_ptr, new_run_ptr,
    C, STATS_STRIDE, SAVED_STRIDE, RUN_STRIDE, eps, momentum,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BATCH_STATS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
):
    """One program: BLOCK_C channels.

    count_ptr [R], rmean_ptr / rm2_ptr [R, C]: the statistics rows (fp64),
    merged in fp64; the outputs are fp32.
    weight_ptr, bias_ptr: gamma, beta [C] (any float type; HAS_WEIGHT /
    HAS_BIAS). run_mean_ptr, run_var_ptr: running stats [C] (HAS_RUNNING).
    stats_ptr: out, [STATS_ROWS, C] at row * STATS_STRIDE + c (module docstring).
    saved_ptr: out, [2, C] at row * SAVED_STRIDE + c: mean, invstd again (what
    the op saves for backward).
    new_run_ptr: out, [2, C] at row * RUN_STRIDE + c: the running mean and
    variance after this step (nn.BatchNorm2d's update with the exponential
    average factor `momentum`, unbiased variance n/(n-1)); without running
    stats the batch mean and unbiased variance.
    BATCH_STATS False: normalize with the running stats (eval-mode norm);
    the rows are not read and the running stats come back unchanged.
    """
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if BATCH_STATS:
        offs_r = tl.arange(0, BLOCK_R)
        total = tl.zeros((BLOCK_C,), dtype=tl.float64)
        counts = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            cnt = tl.load(count_ptr + r, mask=r < R, other=0.0)
            mean_r = tl.load(rmean_ptr + r[:, None] * C + offs_c[None, :], mask=(r < R)[:, None] & c_mask[None, :],
                             other=0.0)
            total += tl.sum(cnt[:, None] * mean_r, 0)
            counts += cnt
        n = tl.sum(counts, 0)
        mean = total / n
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + offs_r
            rc_mask = (r < R)[:, None] & c_mask[None, :]
            cnt = tl.load(count_ptr + r, mask=r < R, other=0.0)
            mean_r = tl.load(rmean_ptr + r[:, None] * C + offs_c[None, :], mask=rc_mask, other=0.0)
            m2_r = tl.load(rm2_ptr + r[:, None] * C + offs_c[None, :], mask=rc_mask, other=0.0)
            dev = mean_r - mean[None, :]
            m2 += tl.sum(m2_r + cnt[:, None] * dev * dev, 0)
        var = m2 / n
        unbiased = (m2 / (n - 1.0)).to(tl.float32)
        mean = mean.to(tl.float32)
        if HAS_RUNNING:
            old_mean = tl.load(run_mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            old_var = tl.load(run_var_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            new_mean = (1.0 - momentum) * old_mean + momentum * mean
            new_var = (1.0 - momentum) * old_var + momentum * unbiased
        else:
            new_mean = mean
            new_var = unbiased
        invstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
        n = n.to(tl.float32)
    else:
        mean = tl.load(run_mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        var = tl.load(run_var_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        n = 0.0  # unused: the backward of a running-stats norm needs no count
        new_mean = mean
        new_var = var
        invstd = 1.0 / tl.sqrt(var + eps)
    store_bn(stats_ptr, STATS_STRIDE, offs_c, c_mask, mean, invstd, n, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)
    tl.store(saved_ptr + offs_c, mean, mask=c_mask)
    tl.store(saved_ptr + SAVED_STRIDE + offs_c, invstd, mask=c_mask)
    tl.store(new_run_ptr + offs_c, new_mean, mask=c_mask)
    tl.store(new_run_ptr + RUN_STRIDE + offs_c, new_var, mask=c_mask)


@triton.jit
def _restore_kernel(saved_ptr, weight_ptr, bias_ptr, stats_ptr, C, SAVED_STRIDE, STATS_STRIDE, n,
                    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The backward's [STATS_ROWS, C] block of one norm from what the op
    saved: saved_ptr [2, C] (mean, invstd; row stride SAVED_STRIDE), the
    affine parameters (HAS_WEIGHT / HAS_BIAS; any float type) and n.
    stats_ptr: out, rows at row * STATS_STRIDE."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean = tl.load(saved_ptr + offs_c, mask=c_mask, other=0.0)
    invstd = tl.load(saved_ptr + SAVED_STRIDE + offs_c, mask=c_mask, other=0.0)
    store_bn(stats_ptr, STATS_STRIDE, offs_c, c_mask, mean, invstd, n, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, R, J, C, OUT_STRIDE, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[j, c] = sum_r part[r, j, c] in a fixed order, accumulated in fp64.
    part_ptr: [R, J, C] contiguous (fp32 or fp64); out_ptr: [J, C] at
    j * OUT_STRIDE + c, stored in its own dtype. Grid: (cdiv(C, BLOCK_C), J)."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_mask = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        r = (r0 + offs_r).to(tl.int64)
        v = tl.load(part_ptr + (r[:, None] * J + j) * C + offs_c[None, :], mask=(r < R)[:, None] & c_mask[None, :],
                    other=0.0)
        acc += tl.sum(v.to(tl.float64), 0)
    tl.store(out_ptr + j * OUT_STRIDE + offs_c, acc.to(out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _coefficients_kernel(sum_dz_ptr, sum_dzx_ptr, stats_ptr, coef_ptr, C, STATS_STRIDE,
                         BLOCK_C: tl.constexpr, BATCH_STATS: tl.constexpr):
    """BatchNorm's backward as dy = a*dz + b*(y - mean) + c per channel.

    sum_dz_ptr, sum_dzx_ptr: [C] fp64, sum dz and sum dz*xhat over all
    values; stats_ptr: the norm's [STATS_ROWS, C] block. coef_ptr: out, [3, C]
    contiguous (a, b, c). With batch statistics (the mean and variance depend
    on y): a = scale, b = -scale*invstd*sum(dz*xhat)/n, c = -scale*sum(dz)/n;
    with running statistics: a = scale, b = c = 0.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    scale = tl.load(stats_ptr + 2 * STATS_STRIDE + offs_c, mask=c_mask, other=0.0)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    c = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if BATCH_STATS:
        invstd = tl.load(stats_ptr + 1 * STATS_STRIDE + offs_c, mask=c_mask, other=0.0)
        n = tl.load(stats_ptr + 4 * STATS_STRIDE + offs_c, mask=c_mask, other=1.0)
        sum_dz = tl.load(sum_dz_ptr + offs_c, mask=c_mask, other=0.0)
        sum_dzx = tl.load(sum_dzx_ptr + offs_c, mask=c_mask, other=0.0)
        b = -scale * invstd * (sum_dzx / n).to(tl.float32)
        c = -scale * (sum_dz / n).to(tl.float32)
    tl.store(coef_ptr + offs_c, scale, mask=c_mask)
    tl.store(coef_ptr + C + offs_c, b, mask=c_mask)
    tl.store(coef_ptr + 2 * C + offs_c, c, mask=c_mask)


def _block_c(c):
    return 128 if not interpreting() else max(16, min(256, triton.next_power_of_2(c)))


BLOCK_R = 64  # rows per tl.sum step: fixes the merge order (deterministic)


def finalize(rows, weight, bias, running_mean, running_var, stats, saved, new_running, eps, momentum, batch_stats):
    """Launch the forward finalize of one norm: writes stats [STATS_ROWS, C],
    saved [2, C] and new_running [2, C] (fp32 views; see _finalize_kernel).
    rows: StatisticsRows (ignored without batch_stats); weight, bias,
    running_mean, running_var: the norm's tensors or None."""
    c = stats.shape[1]
    bc = _block_c(c)
    rows_mean = rows.mean if batch_stats else stats
    args = (rows.count if batch_stats else stats, rows_mean, rows.m2 if batch_stats else stats,
            rows_mean.shape[0] if batch_stats else 0, *(t if t is not None else stats for t in
                                                       (weight, bias, running_mean, running_var)),
            stats, saved, new_running, c, stats.stride(0), saved.stride(0), new_running.stride(0), float(eps),
            float(momentum))
    consts = {"BLOCK_C": bc, "BLOCK_R": BLOCK_R, "BATCH_STATS": bool(batch_stats), "HAS_WEIGHT": weight is not None,
              "HAS_BIAS": bias is not None, "HAS_RUNNING": running_mean is not None}
    launch_fixed(_finalize_kernel, (cdiv(c, bc),), args, consts, 4, 1)


def restore(saved, weight, bias, n, stats):
    """Fill one norm's backward stats block [STATS_ROWS, C] (a view) from its
    saved [2, C] rows, affine parameters (or None) and count n."""
    c = stats.shape[1]
    bc = _block_c(c)
    args = (saved, saved if weight is None else weight, saved if bias is None else bias, stats, c, saved.stride(0),
            stats.stride(0), float(n))
    launch_fixed(_restore_kernel, (cdiv(c, bc),), args,
                 {"BLOCK_C": bc, "HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}, 4, 1)
    return stats


def sum_rows(part, out):
    """out [J, C] (a view with unit column stride) = part [R, J, C].sum(0),
    in a fixed order."""
    r, j, c = part.shape
    bc = _block_c(c)
    launch_fixed(_sum_rows_kernel, (cdiv(c, bc), j), (part, out, r, j, c, out.stride(0)),
                 {"BLOCK_C": bc, "BLOCK_R": BLOCK_R}, 4, 1)
    return out


def backward_coefficients(sum_dz, sum_dzx, stats, coef, batch_stats):
    """coef [3, C] contiguous (a, b, c) of one norm from its gradient sums
    ([C] fp64 each) and its stats block."""
    c = stats.shape[1]
    bc = _block_c(c)
    launch_fixed(_coefficients_kernel, (cdiv(c, bc),), (sum_dz, sum_dzx, stats, coef, c, stats.stride(0)),
                 {"BLOCK_C": bc, "BATCH_STATS": bool(batch_stats)}, 4, 1)
    return coef


__all__ = ["backward_coefficients", "finalize", "restore", "sum_rows"]
