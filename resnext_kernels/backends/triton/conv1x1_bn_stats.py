"""Training forward of a 1x1 conv: a GEMM over NHWC pixels whose epilogue
writes the raw output y and per-tile partial BatchNorm statistics; with a
prologue, the previous BatchNorm + ReLU is applied to the input as it loads.

    y[m, n] = sum_k A[m, k] * w[n, k]          m: output pixel (n, ho, wo)
    A[m, k] = a[row(m), k]                                 conv1, projection (row: the strided input pixel)
            = relu(bn(a[m, k]))  (rounded to the dtype)    conv3 on y2, BN2 + ReLU in the prologue
    stats rows (one per BLOCK_M pixels): count, mean, M2 of the rounded y

Used for conv1 (x -> y1), conv3 (y2 -> y3, prologue BN2 + ReLU) and the
projection shortcut (x at stride s -> yd). Statistics come from y rounded
to the activation dtype, as eager computes them from the conv's output.
"""

import torch
import triton
import triton.language as tl

from ...common.batch_stats import StatisticsRows
from ...common.sizes import cdiv
from ._bn import bn_relu, tile_mean_m2
from ._common import dot_precision, launch_fixed, training_gemm_tiles


@triton.jit
def _conv1x1_bn_stats_kernel(
    a_ptr, w_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, pmean_ptr, pm2_ptr, pcount_ptr,
    M, K, NOUT, HWO, WO, H, W, STRIDE, swn, swk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr, PREC: tl.constexpr,
):
    """One program: y for BLOCK_M output pixels x BLOCK_N channels, and their
    statistics row.

    a_ptr:  the input, [N*H*W, K] pixel rows (channels_last), act dtype.
    w_ptr:  the conv weight [NOUT, K(, 1, 1)], element (n, k) at n*swn + k*swk.
    y_ptr:  y, [M, NOUT] pixel rows, act dtype, M = N*HO*WO output pixels.
    mean_ptr, scale_ptr, beta_ptr: [K] fp32, the prologue's BatchNorm
            (PROLOGUE only; else any pointer).
    pmean_ptr, pm2_ptr: [cdiv(M, BLOCK_M), NOUT] fp64, this tile's row of
            the statistics (mean, M2); pcount_ptr: [cdiv(M, BLOCK_M)] fp64, its
            count (written by the programs of the first channel tile).
    HWO = HO*WO, WO: output size; H, W: input size; output pixel (n, ho, wo)
    reads input pixel (n, ho*STRIDE, wo*STRIDE).
    Grid: (cdiv(M, BLOCK_M) * cdiv(NOUT, BLOCK_N),), channel tiles fastest.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(NOUT, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    dtype = y_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < NOUT

    m64 = offs_m.to(tl.int64)  # pixels x channels can pass 2**31
    img = m64 // HWO
    rem = m64 % HWO
    a_row = (img * H + (rem // WO) * STRIDE) * W + (rem % WO) * STRIDE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_row[:, None] * K + k[None, :], mask=a_mask, other=0.0)
        if PROLOGUE:
            mean = tl.load(mean_ptr + k, mask=k_mask, other=0.0)
            scale = tl.load(scale_ptr + k, mask=k_mask, other=0.0)
            beta = tl.load(beta_ptr + k, mask=k_mask, other=0.0)
            a = bn_relu(a, mean[None, :], scale[None, :], beta[None, :], dtype)
            a = tl.where(a_mask, a, tl.zeros_like(a))  # masked rows/columns contribute nothing
        b = tl.load(w_ptr + offs_n[None, :] * swn + k[:, None] * swk, mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)

    y = acc.to(dtype)
    tl.store(y_ptr + m64[:, None] * NOUT + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
    cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float64)
    mean_t, m2_t = tile_mean_m2(y, m_mask, cnt)
    tl.store(pmean_ptr + pid_m * NOUT + offs_n, mean_t, mask=n_mask)
    tl.store(pm2_ptr + pid_m * NOUT + offs_n, m2_t, mask=n_mask)
    if pid_n == 0:
        tl.store(pcount_ptr + pid_m, cnt)


def _kernel_args(a, weight, y, prologue, stride, stats):
    """(positional args, constexpr kwargs) of the kernel; see conv1x1_bn_stats.
    a and y are channels_last-contiguous [N, C, H, W]: their data are the
    kernel's pixel rows."""
    n, k, h, w = a.shape
    _, nout, ho, wo = y.shape
    w2d = weight.reshape(nout, k)
    mean, scale, beta = prologue if prologue is not None else (w2d, w2d, w2d)
    args = (a, w2d, y, mean, scale, beta, stats.mean, stats.m2, stats.count,
            n * ho * wo, k, nout, ho * wo, wo, h, w, stride, *w2d.stride())
    return args, {"PROLOGUE": prologue is not None, "PREC": dot_precision(a.dtype)}


def tiles(a, nout):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for input a [N, K, H, W] and nout channels."""
    return training_gemm_tiles(nout, a.shape[1], a.element_size(), dot_precision(a.dtype))


def conv1x1_bn_stats(a, weight, y, prologue=None, stride=1):
    """Launch: y = conv1x1(A, weight) (A = a at stride, or relu(bn(a)) with
    `prologue`) and return its StatisticsRows.

    a: [N, K, H, W] channels_last contiguous (x, or y2); weight [NOUT, K, 1,
    1]; y: [N, NOUT, Ho, Wo] channels_last contiguous, written completely;
    prologue: None or (mean, scale, beta), fp32 [K] each (bn_statistics
    finalize rows: scale = gamma * invstd, beta = BN's bias or 0).
    """
    bm, bn, bk, warps, stages = tiles(a, y.shape[1])
    m = y.shape[0] * y.shape[2] * y.shape[3]
    n_rows = cdiv(m, bm)
    dev = a.device
    f64 = torch.float64
    stats = StatisticsRows(torch.empty(n_rows, device=dev, dtype=f64),
                           torch.empty(n_rows, y.shape[1], device=dev, dtype=f64),
                           torch.empty(n_rows, y.shape[1], device=dev, dtype=f64))
    args, consts = _kernel_args(a, weight, y, prologue, stride, stats)
    grid = (n_rows * cdiv(y.shape[1], bn),)
    launch_fixed(_conv1x1_bn_stats_kernel, grid, args, {**consts, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                 warps, stages)
    return stats


__all__ = ["conv1x1_bn_stats"]
