"""Training backward of the grouped 3x3 conv, input gradient (dgrad), with
BN2's backward in the prologue and ReLU1's and BN1's in the epilogue.

    dy2[p', o] = a2*dz2 + b2*(y2 - mean2) + c2                   prologue (rounded), at output pixels p'
    dt1[p, i]  = sum_{tap, o in i's group} dy2[p'(p, tap), o] * w2[o, i, tap]
    dz1 = threshold_backward(dt1, relu(bn1(y1)))                  stored (act dtype)
    partial sums per tile: sum dz1, sum dz1 * xhat1               (BN1's backward)

For input pixel (h, w) and tap (kh, kw) the output pixel is
ho = (h + DIL - kh*DIL) / STRIDE (likewise wo), when that divides exactly
and lies inside the output. Same group packing as the forward
(grouped_conv_bn_stats.py): a program owns one packed tile of GT *input*
channels and sweeps the KCH output chunks of its group (the d > GT trap
holds for dgrad too); the weight tile is w2p read transposed.
"""

import torch
import triton
import triton.language as tl

from ...common.sizes import cdiv
from ._bn import bn_grad_input, load_bn, real_channel, store_relu_bn_grad
from ._common import dot_precision, interpreting, launch_fixed
from .grouped_conv_bias_relu import has_nan
from .grouped_conv_bn_stats import block_p


@triton.jit
def _dy2(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, row, o, mask, o_ok, WIDTH, dtype: tl.constexpr):
    """BN2's input gradient at output pixel rows `row` and real channels o
    ([1, GT] or [GT] per column), rounded to dtype; 0 where masked."""
    off = row[:, None] * WIDTH + o
    mean = tl.load(stats2_ptr + o, mask=o_ok, other=0.0)
    ca = tl.load(coef2_ptr + o, mask=o_ok, other=0.0)
    cb = tl.load(coef2_ptr + WIDTH + o, mask=o_ok, other=0.0)
    cc = tl.load(coef2_ptr + 2 * WIDTH + o, mask=o_ok, other=0.0)
    dy2 = bn_grad_input(tl.load(dz2_ptr + off, mask=mask, other=0.0), tl.load(y2_ptr + off, mask=mask, other=0.0),
                        mean, ca, cb, cc, dtype)
    return tl.where(mask, dy2, tl.zeros_like(dy2))


@triton.jit
def _dgrad_tile(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, w2_ptr, it, img, h, w, p_mask, HO, WO, WIDTH, D, D_P, GROUPS,
                N_TILES, STRIDE, DIL, BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr,
                MIXES: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr, dtype: tl.constexpr):
    """dt1 [BLOCK_P, GT] (fp32) of packed input tile `it` at input pixels
    (img, h, w). The plain path multiplies the zeros of masked rows (taps
    that fall outside the output or between stride-2 pixels) and of the
    block-diagonal weight's off-group entries (MIXES) like any others, so a
    non-finite weight or gradient makes 0 * inf = NaN there. EXACT (the
    kernel runs it only when the plain result holds a NaN) adds only what
    eager's conv backward adds: each tap's contribution only at the rows
    where it is valid, and with MIXES (D_P < GT, KCH == 1) each input
    channel's sum over its own group's D_P output channels, with FMAs."""
    offs_g = tl.arange(0, GT)
    group_tile0 = (it // KCH) * KCH  # first packed tile of this tile's group
    kc_in = it % KCH  # this tile's chunk among the group's inputs
    acc = tl.zeros((BLOCK_P, GT), dtype=tl.float32)
    for tap in range(9):
        nh = h + DIL - (tap // 3) * DIL
        nw = w + DIL - (tap % 3) * DIL
        ho = nh // STRIDE
        wo = nw // STRIDE
        valid = (p_mask & (nh >= 0) & (nw >= 0) & (nh % STRIDE == 0) & (nw % STRIDE == 0)
                 & (ho < HO) & (wo < WO))
        row = (img * HO + ho) * WO + wo
        if EXACT and MIXES:
            first = offs_g - offs_g % D_P  # each input channel's group, as a channel of the tile
            for i in range(D_P):  # dynamic: this rare path should not cost registers
                o, o_ok = real_channel(it * GT + first + i, D, D_P, GROUPS)
                dy2 = _dy2(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, row, o[None, :], valid[:, None] & o_ok[None, :],
                           o_ok[None, :], WIDTH, dtype)
                # w2p[tap, it, 0, c, first(c) + i]: input channel c, output first(c) + i
                wv = tl.load(w2_ptr + ((tap * N_TILES + it) * GT + offs_g) * GT + first + i)
                acc += tl.where(valid[:, None], dy2.to(tl.float32) * wv.to(tl.float32)[None, :], 0.0)
        else:
            for s in tl.static_range(KCH):
                ot = group_tile0 + s  # an output tile of the group
                o, o_ok = real_channel(ot * GT + offs_g, D, D_P, GROUPS)
                dy2 = _dy2(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, row, o[None, :], valid[:, None] & o_ok[None, :],
                           o_ok[None, :], WIDTH, dtype)
                # w2p[tap, ot, kc_in] is [in i, out j]; the dgrad needs [out j, in i].
                w_off = (((tap * N_TILES + ot) * KCH + kc_in) * GT + offs_g[None, :]) * GT + offs_g[:, None]
                if EXACT:
                    acc += tl.where(valid[:, None], tl.dot(dy2, tl.load(w2_ptr + w_off), input_precision=PREC), 0.0)
                else:
                    acc = tl.dot(dy2, tl.load(w2_ptr + w_off), acc, input_precision=PREC)
    return acc


@triton.jit
def _grouped_conv_dgrad_kernel(
    dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, w2_ptr, y1_ptr, stats1_ptr, dz1_ptr, part_ptr,
    M_IN, HW, W, HO, WO, WIDTH, D, D_P, GROUPS, N_TILES, STRIDE, DIL, STATS_STRIDE,
    BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr, MIXES: tl.constexpr, PREC: tl.constexpr,
):
    """One program: dz1 for BLOCK_P input pixels x one packed tile of GT channels.

    dz2_ptr, y2_ptr: [N*HO*WO, WIDTH] pixel rows, act dtype; stats2_ptr: BN2's
    [STATS_ROWS, WIDTH] block (row stride STATS_STRIDE); coef2_ptr [3, WIDTH].
    w2_ptr: w2p [9, N_TILES, KCH, GT, GT]. y1_ptr, dz1_ptr (out): [M_IN,
    WIDTH] pixel rows, M_IN = N*H*W; stats1_ptr: BN1's block.
    part_ptr: out, [cdiv(M_IN, BLOCK_P), 2, WIDTH] fp64 (_bn.bn_grad_sums).
    MIXES: several groups per tile (D_P < GT; packing.GroupTiling.mixes_groups).
    Grid: (cdiv(M_IN, BLOCK_P) * N_TILES,), tiles fastest.
    """
    pid = tl.program_id(0)
    pid_p = pid // N_TILES
    it = pid % N_TILES  # this program's packed input tile
    dtype = dz1_ptr.dtype.element_ty

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, GT)
    p_mask = offs_p < M_IN
    p64 = offs_p.to(tl.int64)
    img = p64 // HW
    rem = p64 % HW
    h = rem // W
    w = rem % W

    acc = _dgrad_tile(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, w2_ptr, it, img, h, w, p_mask, HO, WO, WIDTH, D, D_P,
                      GROUPS, N_TILES, STRIDE, DIL, BLOCK_P, GT, KCH, MIXES, False, PREC, dtype)
    if has_nan(acc):  # maybe a 0 * inf of a masked row or another group: recompute as eager adds
        acc = _dgrad_tile(dz2_ptr, y2_ptr, stats2_ptr, coef2_ptr, w2_ptr, it, img, h, w, p_mask, HO, WO, WIDTH,
                          D, D_P, GROUPS, N_TILES, STRIDE, DIL, BLOCK_P, GT, KCH, MIXES, True, PREC, dtype)

    c, c_ok = real_channel(it * GT + offs_g, D, D_P, GROUPS)
    mask = p_mask[:, None] & c_ok[None, :]
    off = p64[:, None] * WIDTH + c[None, :]
    y1 = tl.load(y1_ptr + off, mask=mask, other=0.0)
    mean1, invstd1, scale1, beta1 = load_bn(stats1_ptr, STATS_STRIDE, c, c_ok)
    sum_dz, sum_dzx = store_relu_bn_grad(dz1_ptr, off, acc, y1, mean1, invstd1, scale1, beta1, mask, dtype)
    part = part_ptr + (pid_p * 2) * WIDTH + c
    tl.store(part, sum_dz, mask=c_ok)
    tl.store(part + WIDTH, sum_dzx, mask=c_ok)


def grouped_conv_dgrad(dz2, y2, stats2, coef2, w2p, tiling, y1, stats1, dz1, stride, dilation):
    """Launch: dz1 (written completely) and BN1's partial sums [T, 2, width] fp64.

    dz2, y2 [N, width, Ho, Wo]; y1, dz1 [N, width, H, W]: channels_last
    contiguous, real channel order. stats2, stats1: the norms' [STATS_ROWS,
    width] blocks; coef2 [3, width] fp32; w2p, tiling from packing.py.
    """
    n, width, h, w = y1.shape
    ho, wo = y2.shape[2], y2.shape[3]
    # At stride 2 the tap's output-pixel arithmetic (divisibility, bounds)
    # took the 128-pixel tile to 255 registers and 20 bytes of spills on
    # sm_90a (s2_first, bf16; bench/triton_compile.py --training); 64 fit.
    bp = block_p(tiling, y1.dtype) if stride == 1 or interpreting() else 64
    m_in = n * h * w
    t = tiling
    part = torch.empty(cdiv(m_in, bp), 2, width, device=y1.device, dtype=torch.float64)
    args = (dz2, y2, stats2, coef2, w2p, y1, stats1, dz1, part, m_in, h * w, w, ho, wo, width, t.d, t.d_p,
            t.groups, t.n_tiles, stride, dilation, stats1.stride(0))
    consts = {"BLOCK_P": bp, "GT": t.gt, "KCH": t.kch, "MIXES": t.mixes_groups, "PREC": dot_precision(y1.dtype)}
    launch_fixed(_grouped_conv_dgrad_kernel, (cdiv(m_in, bp) * t.n_tiles,), args, consts, 4, 2)
    return part


__all__ = ["grouped_conv_dgrad"]
