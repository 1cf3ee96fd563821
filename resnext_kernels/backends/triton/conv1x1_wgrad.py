"""Training backward of a 1x1 conv, weight gradient (wgrad): a GEMM whose
reduction runs over the pixels, split into SPLITS pixel ranges (partial
results summed in a fixed order by bn_statistics.sum_rows; no atomics).

    dW[n, k] = sum_m dy[m, n] * A[m, k]
    dy[m, n] = a[n]*dz[m, n] + b[n]*(y[m, n] - mean[n]) + c[n]   (the following BN's backward, rounded)
    A[m, k]  = src[row(m), k]                  x for conv1, x at the strided pixel for the projection
             = relu(bn(src[m, k]))  (rounded)  t2 recomputed from y2 for conv3 (PROLOGUE)
"""

import torch
import triton
import triton.language as tl

from ...common.sizes import cdiv, next_pow2
from . import _common
from ._bn import bn_grad_input, bn_relu
from ._common import dot_precision, interpreter_pixels, interpreting, launch_fixed
from .bn_statistics import sum_rows


@triton.jit
def _conv1x1_wgrad_kernel(
    dz_ptr, y_ptr, mean_ptr, coef_ptr, a_ptr, amean_ptr, ascale_ptr, abeta_ptr, part_ptr,
    M, N, K, HWO, WO, H, W, STRIDE, PIX_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr, PREC: tl.constexpr,
):
    """One program: dW[BLOCK_N, BLOCK_K] over one pixel range.

    dz_ptr, y_ptr: [M, N] pixel rows (M = Nimg*HWO output pixels), act dtype;
    mean_ptr [N], coef_ptr [3, N] fp32: the following BN (module docstring).
    a_ptr: [Nimg*H*W, K] pixel rows, act dtype; output pixel (n, ho, wo)
    reads input pixel (n, ho*STRIDE, wo*STRIDE). PROLOGUE: amean_ptr,
    ascale_ptr, abeta_ptr [K] fp32, the BN (+ ReLU) applied to a.
    part_ptr: out, [SPLITS, N, K], this split's dW (fp32 when SPLITS > 1,
    else already the weights' dtype).
    Pixels [split * PIX_PER_SPLIT, (split + 1) * PIX_PER_SPLIT) (a multiple
    of BLOCK_M). Grid: (cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K), SPLITS).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid // n_tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid % n_tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    dtype = dz_ptr.dtype.element_ty

    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    ca = tl.load(coef_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    cb = tl.load(coef_ptr + N + offs_n, mask=n_mask, other=0.0)[:, None]
    cc = tl.load(coef_ptr + 2 * N + offs_n, mask=n_mask, other=0.0)[:, None]
    if PROLOGUE:
        amean = tl.load(amean_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        ascale = tl.load(ascale_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        abeta = tl.load(abeta_ptr + offs_k, mask=k_mask, other=0.0)[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = split.to(tl.int64) * PIX_PER_SPLIT
    for m0 in range(0, PIX_PER_SPLIT, BLOCK_M):
        m = start + m0 + tl.arange(0, BLOCK_M)
        m_mask = m < M
        # dy transposed, [BLOCK_N, BLOCK_M]
        nm_mask = n_mask[:, None] & m_mask[None, :]
        off = m[None, :] * N + offs_n[:, None]
        dy = bn_grad_input(tl.load(dz_ptr + off, mask=nm_mask, other=0.0),
                           tl.load(y_ptr + off, mask=nm_mask, other=0.0), mean, ca, cb, cc, dtype)
        dy = tl.where(nm_mask, dy, tl.zeros_like(dy))
        img = m // HWO
        rem = m % HWO
        a_row = (img * H + (rem // WO) * STRIDE) * W + (rem % WO) * STRIDE
        mk_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_row[:, None] * K + offs_k[None, :], mask=mk_mask, other=0.0)
        if PROLOGUE:
            a = bn_relu(a, amean, ascale, abeta, dtype)
            a = tl.where(mk_mask, a, tl.zeros_like(a))
        acc = tl.dot(dy, a, acc, input_precision=PREC)

    out = part_ptr + split.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# Splitting the pixel reduction. A wgrad's output (a weight) is small, so
# its tiles alone may not fill the GPU; the reduction is split into pixel
# ranges until the programs reach TARGET_PROGRAMS (2 per SM of an H100's
# 132), no range is shorter than MIN_PIXELS_PER_SPLIT, and the fp32 partial
# results (written and read once) stay within 1/PARTIAL_BYTES_FRACTION of
# the bytes the wgrad reads anyway (stage 4's 8 MB weights get 1 split).
TARGET_PROGRAMS = 264
MIN_PIXELS_PER_SPLIT = 2048
PARTIAL_BYTES_FRACTION = 8


def gpu_splits(m, output_tiles, partial_bytes, read_bytes):
    """Pixel ranges of a wgrad over m pixels on a GPU (see above):
    output_tiles programs per range, partial_bytes the fp32 result of one
    range, read_bytes what the kernel reads."""
    wanted = max(1, TARGET_PROGRAMS // output_tiles)
    by_bytes = read_bytes // (PARTIAL_BYTES_FRACTION * 2 * partial_bytes)
    return max(1, min(wanted, m // MIN_PIXELS_PER_SPLIT, by_bytes))


def splits(m, output_tiles, partial_bytes, read_bytes):
    """gpu_splits, or 1 under the interpreter; the tests' forced_tiling
    (_common.FORCED.wgrad_splits) overrides both."""
    if _common.FORCED.wgrad_splits is not None:
        return _common.FORCED.wgrad_splits
    return 1 if interpreting() else gpu_splits(m, output_tiles, partial_bytes, read_bytes)


def gpu_tiles(n_ch, k, itemsize, prec):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on a GPU for dW [n_ch, k]:
    up to 128 x 128 output tiles, 64 pixels per step (32 pixels and 64-row
    tiles for full-fp32 "ieee" dots, whose operands sit in registers), 3
    stages (2 for fp32 operands: 3 needed up to 279 KB of shared memory on
    sm_90a)."""
    ieee = itemsize == 4 and prec == "ieee"
    bn = min(64 if ieee else 128, max(16, next_pow2(n_ch)))
    bk = min(128, max(16, next_pow2(k)))
    return 32 if ieee else 64, bn, bk, 8 if bn * bk >= 128 * 128 else 4, 2 if itemsize == 4 else 3


def tiles(dz, k):
    """gpu_tiles for dz's channels and dtype; under the interpreter
    _common.interpreter_pixels() per step."""
    bm, bn, bk, warps, stages = gpu_tiles(dz.shape[1], k, dz.element_size(), dot_precision(dz.dtype))
    return (interpreter_pixels() if interpreting() else bm), bn, bk, warps, stages


def conv1x1_wgrad(dz, y, mean, coef, a, weight_shape, dtype, prologue=None, stride=1):
    """dW of a 1x1 conv [N, K, 1, 1] (weight_shape) in `dtype`.

    dz, y: [Nimg, N, Ho, Wo] channels_last (gradient at the following BN's
    output, the conv's output); mean [N], coef [3, N] fp32; a: the conv's
    input source [Nimg, K, H, W] channels_last, read at `stride`; prologue:
    None or (mean, scale, beta) of a BN + ReLU applied to a.
    Returns [N, K, 1, 1] in dtype (the splits summed in order in fp32, rounded once).
    """
    n_ch, k = weight_shape[0], weight_shape[1]
    m = dz.shape[0] * dz.shape[2] * dz.shape[3]
    bm, bn, bk, warps, stages = tiles(dz, k)
    output_tiles = cdiv(n_ch, bn) * cdiv(k, bk)
    n_splits = splits(m, output_tiles, n_ch * k * 4, m * (k + 2 * n_ch) * dz.element_size())
    per_split = cdiv(cdiv(m, bm), n_splits) * bm
    n_splits = cdiv(m, per_split)
    # One range: the kernel writes dW in the weights' dtype; several: fp32 partials.
    part = torch.empty(n_splits, n_ch, k, device=dz.device, dtype=dtype if n_splits == 1 else torch.float32)
    amean, ascale, abeta = prologue if prologue is not None else (mean, mean, mean)
    args = (dz, y, mean, coef, a, amean, ascale, abeta, part, m, n_ch, k, dz.shape[2] * dz.shape[3], dz.shape[3],
            a.shape[2], a.shape[3], stride, per_split)
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PROLOGUE": prologue is not None,
              "PREC": dot_precision(dz.dtype)}
    launch_fixed(_conv1x1_wgrad_kernel, (output_tiles, n_splits), args, consts, warps, stages)
    if n_splits == 1:
        return part.reshape(n_ch, k, 1, 1)
    grad = torch.empty(1, n_ch * k, device=dz.device)
    sum_rows(part.view(n_splits, 1, n_ch * k), grad)  # fixed order
    return grad.reshape(n_ch, k, 1, 1).to(dtype)


__all__ = ["conv1x1_wgrad", "gpu_splits", "gpu_tiles", "splits"]
