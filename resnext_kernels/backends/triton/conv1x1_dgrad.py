"""Training backward of a 1x1 conv, input gradient (dgrad): a GEMM over NHWC
pixels whose prologue is the following BatchNorm's backward and whose
epilogue is the preceding ReLU's and BatchNorm's, or the shortcut's.

    dy[m, n]  = a[n]*dz[m, n] + b[n]*(y[m, n] - mean[n]) + c[n]     prologue (BN backward, rounded)
    dt[m, k]  = sum_n dy[m, n] * w[n, k]

Epilogue MASK_STATS (conv3's dgrad, dt = d t2):
    dz_prev = threshold_backward(dt, relu(bn_prev(y_prev)))  stored (act dtype)
    partial sums per tile: sum dz_prev, sum dz_prev * xhat_prev  (the previous BN's backward)
Epilogue IDENTITY (conv1's dgrad, identity shortcut):  dx = dt + dz_shortcut
Epilogue PROJECTION (conv1's dgrad, projection):       dx = dt + sum_n dyd[m', n] * wd[n, k]
    where m' is the output pixel of input pixel m when m lies on the stride
    grid (else no shortcut term) and dyd is BN_d's backward of dz_shortcut
    (a second GEMM over Cout in the same program, run before the main one
    so that the off-grid rows can be cleared: a non-finite wd then gives
    NaN only where eager's does).
The gradient sums are added in fp32 and rounded once (eager rounds each).
"""

import torch
import triton
import triton.language as tl

from ...common.sizes import cdiv, conv_output_size
from ._bn import bn_grad_input, load_bn, store_relu_bn_grad
from ._common import dot_precision, launch_fixed, training_gemm_tiles

MASK_STATS, IDENTITY, PROJECTION = 0, 1, 2  # the EPILOGUE constexpr


@triton.jit
def _dy_tile(dz_ptr, y_ptr, mean_ptr, coef_ptr, row, n, mask, n_mask, N, dtype: tl.constexpr):
    """BatchNorm's input gradient at pixel rows `row` [BM] and channels n [BN]
    (of N), rounded to dtype; 0 where masked. coef_ptr: [3, N] (a, b, c)."""
    off = row[:, None] * N + n[None, :]
    dz = tl.load(dz_ptr + off, mask=mask, other=0.0)
    y = tl.load(y_ptr + off, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + n, mask=n_mask, other=0.0)[None, :]
    a = tl.load(coef_ptr + n, mask=n_mask, other=0.0)[None, :]
    b = tl.load(coef_ptr + N + n, mask=n_mask, other=0.0)[None, :]
    c = tl.load(coef_ptr + 2 * N + n, mask=n_mask, other=0.0)[None, :]
    dy = bn_grad_input(dz, y, mean, a, b, c, dtype)
    return tl.where(mask, dy, tl.zeros_like(dy))


@triton.jit
def _conv1x1_dgrad_kernel(
    dz_ptr, y_ptr, mean_ptr, coef_ptr, w_ptr, out_ptr,
    yp_ptr, statsp_ptr, part_ptr,
    sdz_ptr, syd_ptr, smean_ptr, scoef_ptr, wd_ptr,
    M, N, K, NSC, H, W, HO, WO, STRIDE, STATS_STRIDE, swn, swk, swdn, swdk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPILOGUE: tl.constexpr, PREC: tl.constexpr,
):
    """One program: BLOCK_M pixels x BLOCK_K input channels of the gradient.

    dz_ptr, y_ptr: [M, N] pixel rows, act dtype: the gradient at the
        following BN's output and that BN's input (the conv's output).
    mean_ptr [N], coef_ptr [3, N]: fp32, that BN's mean and coefficients (a, b, c).
    w_ptr: the conv weight [N, K(, 1, 1)], (n, k) at n*swn + k*swk.
    out_ptr: out, [M, K] pixel rows, act dtype: dz_prev (MASK_STATS) or dx.
    MASK_STATS: yp_ptr [M, K] the previous conv's output (y2); statsp_ptr
        its BN's [STATS_ROWS, K] block (row stride STATS_STRIDE); part_ptr
        out, [cdiv(M, BLOCK_M), 2, K] fp64 (_bn.bn_grad_sums).
    IDENTITY: sdz_ptr [M, K], dz at the block's output (K == NSC).
    PROJECTION: sdz_ptr, syd_ptr [Nimg*HO*WO, NSC] pixel rows: dz at the
        block's output and yd; smean_ptr [NSC], scoef_ptr [3, NSC]: BN_d;
        wd_ptr: [NSC, K], (n, k) at n*swdn + k*swdk. M = Nimg*H*W input
        pixels; HO, WO, STRIDE: the projection's output grid.
    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),), channel tiles fastest.
    """
    pid = tl.program_id(0)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // n_tiles_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = (pid % n_tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    m64 = offs_m.to(tl.int64)
    dtype = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if EPILOGUE == 2:  # PROJECTION: the shortcut conv's dgrad at the strided pixels, first
        hw = H * W
        img = m64 // hw
        rem = m64 % hw
        h = rem // W
        w_ = rem % W
        on_grid = m_mask & (h % STRIDE == 0) & (w_ % STRIDE == 0)
        row_out = (img * HO + h // STRIDE) * WO + w_ // STRIDE
        for n0 in range(0, NSC, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < NSC
            dyd = _dy_tile(sdz_ptr, syd_ptr, smean_ptr, scoef_ptr, row_out, n,
                           on_grid[:, None] & n_mask[None, :], n_mask, NSC, dtype)
            wd = tl.load(wd_ptr + n[:, None] * swdn + offs_k[None, :] * swdk,
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(dyd, wd, acc, input_precision=PREC)
        # Off-grid rows have no shortcut term; their zero rows of dyd times a
        # non-finite wd would be NaN (0 * inf), where eager adds nothing.
        # Cleared here, before the main GEMM, at no register cost.
        acc = tl.where(on_grid[:, None], acc, 0.0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < N
        dy = _dy_tile(dz_ptr, y_ptr, mean_ptr, coef_ptr, m64, n, m_mask[:, None] & n_mask[None, :], n_mask, N, dtype)
        w = tl.load(w_ptr + n[:, None] * swn + offs_k[None, :] * swk, mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PREC)

    mk_mask = m_mask[:, None] & k_mask[None, :]
    off = m64[:, None] * K + offs_k[None, :]
    if EPILOGUE == 0:  # MASK_STATS
        yp = tl.load(yp_ptr + off, mask=mk_mask, other=0.0)
        mean, invstd, scale, beta = load_bn(statsp_ptr, STATS_STRIDE, offs_k, k_mask)
        sum_dz, sum_dzx = store_relu_bn_grad(out_ptr, off, acc, yp, mean, invstd, scale, beta, mk_mask, dtype)
        part = part_ptr + (pid_m * 2) * K + offs_k
        tl.store(part, sum_dz, mask=k_mask)
        tl.store(part + K, sum_dzx, mask=k_mask)
    else:
        if EPILOGUE == 1:  # IDENTITY
            acc += tl.load(sdz_ptr + off, mask=mk_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, acc.to(dtype), mask=mk_mask)


def _kernel_args(dz, y, mean, coef, weight, out, epilogue, prev=None, shortcut=None, stride=1, part=None):
    """(positional args, constexpr kwargs); tensors as in conv1x1_dgrad."""
    n_img, n_ch, h, w = out.shape[0], weight.shape[0], out.shape[2], out.shape[3]
    k = weight.shape[1]
    w2d = weight.reshape(n_ch, k)
    yp, statsp = prev if prev is not None else (out, mean)
    sdz, syd, smean, scoef, wd = (shortcut if shortcut is not None else (out, out, mean, coef, w2d))
    wd2d = wd.reshape(wd.shape[0], k)
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    args = (dz, y, mean, coef, w2d, out, yp, statsp, part if part is not None else mean,
            sdz, syd, smean, scoef, wd2d,
            n_img * h * w, n_ch, k, wd2d.shape[0], h, w, ho, wo, stride, statsp.stride(0), *w2d.stride(),
            *wd2d.stride())
    return args, {"EPILOGUE": epilogue, "PREC": dot_precision(out.dtype)}


def tiles(out, n_ch):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for out [.., K, ..] and a
    reduction over n_ch channels: BLOCK_N is the reduction chunk, BLOCK_K
    the output-channel tile."""
    bm, b_out, b_red, warps, stages = training_gemm_tiles(out.shape[1], n_ch, out.element_size(),
                                                          dot_precision(out.dtype))
    return bm, b_red, b_out, warps, stages


def conv1x1_dgrad(dz, y, mean, coef, weight, out, prev=None, shortcut=None, stride=1):
    """Launch the dgrad of a 1x1 conv `weight` [N, K, 1, 1] through its BN.

    dz, y: [Nimg, N, H, W] channels_last (the gradient at the BN's output,
    the conv's output); mean [N], coef [3, N] fp32; out [Nimg, K, H, W]
    channels_last, written completely.
    prev = (y_prev [Nimg, K, H, W], stats_prev [STATS_ROWS, K]): MASK_STATS
        epilogue; returns the partial sums [T, 2, K] fp64.
    shortcut = (dz_out,) for IDENTITY (dz_out [Nimg, K, H, W]), or
        (dz_out [Nimg, Cout, Ho, Wo], yd, mean_d, coef_d, wd [Cout, K, 1, 1])
        for PROJECTION at `stride`. Returns None then.
    """
    n_ch = weight.shape[0]
    bm, bn, bk, warps, stages = tiles(out, n_ch)
    m = out.shape[0] * out.shape[2] * out.shape[3]
    part = None
    if prev is not None:
        epilogue = MASK_STATS
        part = torch.empty(cdiv(m, bm), 2, out.shape[1], device=out.device, dtype=torch.float64)
    elif len(shortcut) == 1:
        epilogue, shortcut = IDENTITY, (shortcut[0], out, mean, coef, weight)
    else:
        epilogue = PROJECTION
    args, consts = _kernel_args(dz, y, mean, coef, weight, out, epilogue, prev, shortcut, stride, part)
    grid = (cdiv(m, bm) * cdiv(out.shape[1], bk),)
    launch_fixed(_conv1x1_dgrad_kernel, grid, args, {**consts, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                 warps, stages)
    return part


__all__ = ["conv1x1_dgrad"]
