"""Training backward of the grouped 3x3 conv, weight gradient (wgrad), in
the packed layout of packing.py, with BN1 + ReLU recomputed on its input
and BN2's backward on its gradient, both as prologues.

    dw2p[tap, ot, kc, i, j] = sum_p t1(p_in(p, tap), chunk kc)[i] * dy2[p, tile ot][j]
    t1  = relu(bn1(y1)) at the tap's input pixel (zero padding of t1), rounded
    dy2 = a2*dz2 + b2*(y2 - mean2) + c2, rounded

The reduction over output pixels is split into SPLITS ranges (fixed-order
sum of the partial results, bn_statistics.sum_rows); the launcher unpacks
the real entries (packing.unpack_w2), dropping the cross-group products of
block-diagonal tiles.
"""

import torch
import triton
import triton.language as tl

from ...common.sizes import cdiv
from ._bn import bn_grad_input, bn_relu, load_bn, real_channel
from ._common import dot_precision, interpreter_pixels, interpreting, launch_fixed
from .bn_statistics import sum_rows
from .conv1x1_wgrad import splits
from .packing import unpack_w2


@triton.jit
def _grouped_conv_wgrad_kernel(
    y1_ptr, stats1_ptr, dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, part_ptr,
    M_OUT, HWO, WO, H, W, WIDTH, D, D_P, GROUPS, N_TILES, STRIDE, DIL, STATS_STRIDE, PIX_PER_SPLIT,
    BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr, PREC: tl.constexpr,
):
    """One program: one [GT, GT] block of dw2p (tap, output tile, input
    chunk) over one range of output pixels.

    y1_ptr: [N*H*W, WIDTH] pixel rows, stats1_ptr BN1's [STATS_ROWS, WIDTH]
    block; dz2_ptr, y2_ptr: [M_OUT, WIDTH] pixel rows (M_OUT = N*HO*WO),
    stats2_ptr BN2's block, coef2_ptr [3, WIDTH]. part_ptr: out, [SPLITS, 9,
    N_TILES, KCH, GT, GT] (fp32 when SPLITS > 1, else the weights' dtype). Pixels [split * PIX_PER_SPLIT, (split + 1) *
    PIX_PER_SPLIT). Grid: (9 * N_TILES * KCH, SPLITS), the tap fastest: the
    nine programs reading the same dz2, y2 and y1 tiles run together and
    share them in L2.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tap = pid % 9
    kc = (pid // 9) % KCH
    ot = pid // (9 * KCH)
    dtype = dz2_ptr.dtype.element_ty
    offs_g = tl.arange(0, GT)

    ci, ci_ok = real_channel((ot // KCH) * (KCH * GT) + kc * GT + offs_g, D, D_P, GROUPS)  # input chunk
    co, co_ok = real_channel(ot * GT + offs_g, D, D_P, GROUPS)  # output tile
    mean1, _, scale1, beta1 = load_bn(stats1_ptr, STATS_STRIDE, ci, ci_ok)
    mean2 = tl.load(stats2_ptr + co, mask=co_ok, other=0.0)[None, :]
    ca = tl.load(coef2_ptr + co, mask=co_ok, other=0.0)[None, :]
    cb = tl.load(coef2_ptr + WIDTH + co, mask=co_ok, other=0.0)[None, :]
    cc = tl.load(coef2_ptr + 2 * WIDTH + co, mask=co_ok, other=0.0)[None, :]

    acc = tl.zeros((GT, GT), dtype=tl.float32)
    start = split.to(tl.int64) * PIX_PER_SPLIT
    for p0 in range(0, PIX_PER_SPLIT, BLOCK_P):
        p = start + p0 + tl.arange(0, BLOCK_P)
        p_mask = p < M_OUT
        img = p // HWO
        rem = p % HWO
        ho = rem // WO
        wo = rem % WO
        mask2 = p_mask[:, None] & co_ok[None, :]
        off2 = p[:, None] * WIDTH + co[None, :]
        dy2 = bn_grad_input(tl.load(dz2_ptr + off2, mask=mask2, other=0.0),
                            tl.load(y2_ptr + off2, mask=mask2, other=0.0), mean2, ca, cb, cc, dtype)
        dy2 = tl.where(mask2, dy2, tl.zeros_like(dy2))
        hi = ho * STRIDE + (tap // 3 - 1) * DIL
        wi = wo * STRIDE + (tap % 3 - 1) * DIL
        valid = p_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        mask1 = valid[:, None] & ci_ok[None, :]
        y1 = tl.load(y1_ptr + ((img * H + hi) * W + wi)[:, None] * WIDTH + ci[None, :], mask=mask1, other=0.0)
        t1 = bn_relu(y1, mean1, scale1, beta1, dtype)
        t1 = tl.where(mask1, t1, tl.zeros_like(t1))  # zero padding of t1
        acc = tl.dot(tl.trans(t1), dy2, acc, input_precision=PREC)

    block = (tap * N_TILES + ot) * KCH + kc  # the [9, N_TILES, KCH] layout of dw2p
    out = part_ptr + (split.to(tl.int64) * (9 * N_TILES * KCH) + block) * (GT * GT)
    tl.store(out + offs_g[:, None] * GT + offs_g[None, :], acc.to(part_ptr.dtype.element_ty))


def block_p():
    """Output pixels per reduction step: 64 (interpreter_pixels() in the interpreter)."""
    return interpreter_pixels() if interpreting() else 64


def grouped_conv_wgrad(y1, stats1, dz2, y2, stats2, coef2, tiling, stride, dilation, dtype):
    """The grouped conv's weight gradient, [width, d, 3, 3] in `dtype`.

    y1 [N, width, H, W]; dz2, y2 [N, width, Ho, Wo]: channels_last
    contiguous; stats1, stats2: [STATS_ROWS, width] blocks of BN1, BN2 (same
    row stride); coef2 [3, width].
    """
    t = tiling
    n, width, h, w = y1.shape
    ho, wo = y2.shape[2], y2.shape[3]
    m_out = n * ho * wo
    bp = block_p()
    blocks = 9 * t.n_tiles * t.kch
    n_splits = splits(m_out, blocks, blocks * t.gt * t.gt * 4, m_out * 3 * width * y1.element_size())
    per_split = cdiv(cdiv(m_out, bp), n_splits) * bp
    n_splits = cdiv(m_out, per_split)
    # One range: the kernel writes in the weights' dtype; several: fp32 partials.
    part = torch.empty(n_splits, 9, t.n_tiles, t.kch, t.gt, t.gt, device=y1.device,
                       dtype=dtype if n_splits == 1 else torch.float32)
    args = (y1, stats1, dz2, y2, stats2, coef2, part, m_out, ho * wo, wo, h, w, width, t.d, t.d_p, t.groups,
            t.n_tiles, stride, dilation, stats1.stride(0), per_split)
    consts = {"BLOCK_P": bp, "GT": t.gt, "KCH": t.kch, "PREC": dot_precision(y1.dtype)}
    launch_fixed(_grouped_conv_wgrad_kernel, (blocks, n_splits), args, consts, 4, 2)
    if n_splits > 1:
        summed = torch.empty(1, part[0].numel(), device=y1.device)
        sum_rows(part.view(n_splits, 1, -1), summed)  # fixed order
        part = summed
    return unpack_w2(part.view(9, t.n_tiles, t.kch, t.gt, t.gt), t).to(dtype)


__all__ = ["grouped_conv_wgrad"]
