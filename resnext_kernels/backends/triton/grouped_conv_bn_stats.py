"""Training forward of the grouped 3x3 conv: BN1 + ReLU applied to y1 as it
loads (prologue), y2 and per-tile partial BatchNorm statistics written by
the epilogue.

    t1 = relu(bn1(y1))                                     recomputed per tap, never stored
    y2[p, tile] = sum_{tap, chunk} t1_window(tap, chunk) @ w2p[tap, tile, chunk]
    stats rows (one per BLOCK_P output pixels): count, mean, M2 of the rounded y2

Activations (y1, y2) are channels_last tensors in *real* channel order; the
kernel works in the packed channels of packing.py (group g padded to d_p
channels, GT-channel tiles, block-diagonal w2p for d_p <= 16, KCH input
chunks per tile for d_p > GT) and maps each packed channel to its real one
(_bn.real_channel) on load and store. Padding channels load as 0 and are
never stored.

Zero padding applies to the post-ReLU activation t1, not to y1: outside the
image (and in padding channels) the prologue's result is replaced by 0, not
relu(bn1(0)). The trap of d > GT: an output tile's inputs are its whole
group, so the loop sweeps the group's KCH input chunks.
"""

import torch
import triton
import triton.language as tl

from ...common.batch_stats import StatisticsRows
from ...common.sizes import cdiv
from ._bn import bn_relu, real_channel, tile_mean_m2
from ._common import dot_precision, interpreter_pixels, interpreting, launch_fixed


@triton.jit
def _grouped_conv_bn_stats_kernel(
    y1_ptr, w2_ptr, y2_ptr, mean_ptr, scale_ptr, beta_ptr, pmean_ptr, pm2_ptr, pcount_ptr,
    M_OUT, HWO, WO, H, W, WIDTH, D, D_P, GROUPS, N_TILES, STRIDE, DIL,
    BLOCK_P: tl.constexpr, GT: tl.constexpr, KCH: tl.constexpr, PREC: tl.constexpr,
):
    """One program: y2 for BLOCK_P output pixels x one packed tile of GT
    channels, and the tile's statistics row.

    y1_ptr: y1 [N*H*W, WIDTH] pixel rows (channels_last), act dtype.
    w2_ptr: w2p [9, N_TILES, KCH, GT, GT] contiguous (packing.pack_w2).
    y2_ptr: y2 [M_OUT, WIDTH] pixel rows, act dtype; M_OUT = N*HO*WO.
    mean_ptr, scale_ptr, beta_ptr: BN1, [WIDTH] fp32 (real channels).
    pmean_ptr, pm2_ptr: [cdiv(M_OUT, BLOCK_P), WIDTH] fp64 statistics rows;
    pcount_ptr: [cdiv(M_OUT, BLOCK_P)] fp64 (written by tile 0's programs).
    D, D_P, GROUPS: group width, padded width, groups; input pixel of a tap
    (ho*STRIDE + (kh-1)*DIL, wo*STRIDE + (kw-1)*DIL), padding = DIL.
    Grid: (cdiv(M_OUT, BLOCK_P) * N_TILES,), tiles fastest.
    """
    pid = tl.program_id(0)
    pid_p = pid // N_TILES
    ot = pid % N_TILES
    dtype = y2_ptr.dtype.element_ty

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, GT)
    p_mask = offs_p < M_OUT
    p64 = offs_p.to(tl.int64)  # pixels x channels can pass 2**31
    img = p64 // HWO
    rem = p64 % HWO
    ho = rem // WO
    wo = rem % WO

    in_base = (ot // KCH) * (KCH * GT)  # first packed channel of this tile's group
    acc = tl.zeros((BLOCK_P, GT), dtype=tl.float32)
    for tap in range(9):  # dynamic: a static loop makes the pipeliner buffer all taps
        hi = ho * STRIDE + (tap // 3 - 1) * DIL
        wi = wo * STRIDE + (tap % 3 - 1) * DIL
        valid = p_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        row = (img * H + hi) * W + wi
        for kc in tl.static_range(KCH):
            c, c_ok = real_channel(in_base + kc * GT + offs_g, D, D_P, GROUPS)
            mask = valid[:, None] & c_ok[None, :]
            y1 = tl.load(y1_ptr + row[:, None] * WIDTH + c[None, :], mask=mask, other=0.0)
            mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
            scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
            beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0)
            t1 = bn_relu(y1, mean[None, :], scale[None, :], beta[None, :], dtype)
            t1 = tl.where(mask, t1, tl.zeros_like(t1))  # zero padding of t1, not of y1
            w_off = (((tap * N_TILES + ot) * KCH + kc) * GT + offs_g[:, None]) * GT + offs_g[None, :]
            acc = tl.dot(t1, tl.load(w2_ptr + w_off), acc, input_precision=PREC)

    co, co_ok = real_channel(ot * GT + offs_g, D, D_P, GROUPS)
    y2 = acc.to(dtype)
    tl.store(y2_ptr + p64[:, None] * WIDTH + co[None, :], y2, mask=p_mask[:, None] & co_ok[None, :])
    cnt = tl.minimum(M_OUT - pid_p * BLOCK_P, BLOCK_P).to(tl.float64)
    mean_t, m2_t = tile_mean_m2(y2, p_mask, cnt)
    tl.store(pmean_ptr + pid_p * WIDTH + co, mean_t, mask=co_ok)
    tl.store(pm2_ptr + pid_p * WIDTH + co, m2_t, mask=co_ok)
    if ot == 0:
        tl.store(pcount_ptr + pid_p, cnt)


def block_p(tiling, dtype):
    """Pixels per program of the grouped-conv kernels (forward and dgrad):
    128 (one warpgroup's wgmma M) on 4 warps; 64 where ptxas spilled at 128
    on sm_90a (bench/triton_compile.py --training): groups of 64 channels
    or more per tile sweep (GT * KCH >= 64) and full-fp32 "ieee" dots; 32
    for both at once (676 bytes spilled at 64). The interpreter takes
    interpreter_pixels() (128)."""
    if interpreting():
        return interpreter_pixels()
    ieee = dtype == torch.float32 and dot_precision(dtype) == "ieee"
    wide = tiling.gt * tiling.kch >= 64
    return 32 if wide and ieee else 64 if wide or ieee else 128


def _kernel_args(y1, w2p, y2, tiling, bn1, stride, dilation, stats):
    """(positional args, constexpr kwargs); y1 [N, width, H, W] and y2 [N,
    width, Ho, Wo] channels_last contiguous (their data are pixel rows)."""
    n, width, h, w = y1.shape
    _, _, ho, wo = y2.shape
    t = tiling
    args = (y1, w2p, y2, *bn1, stats.mean, stats.m2, stats.count, n * ho * wo, ho * wo, wo, h, w, width, t.d,
            t.d_p, t.groups, t.n_tiles, stride, dilation)
    return args, {"GT": t.gt, "KCH": t.kch, "PREC": dot_precision(y1.dtype)}


def grouped_conv_bn_stats(y1, w2p, y2, tiling, bn1, stride, dilation):
    """Launch: y2 = grouped3x3(relu(bn1(y1))) and return its StatisticsRows.

    y1 [N, width, H, W], y2 [N, width, Ho, Wo] (written completely): channels_last
    contiguous, real channel order; w2p, tiling: packing.pack_w2 / GroupTiling;
    bn1 = (mean, scale, beta), fp32 [width] each.
    """
    bp = block_p(tiling, y1.dtype)
    m_out = y2.shape[0] * y2.shape[2] * y2.shape[3]
    n_rows = cdiv(m_out, bp)
    width, dev = y2.shape[1], y2.device
    f64 = torch.float64
    stats = StatisticsRows(torch.empty(n_rows, device=dev, dtype=f64), torch.empty(n_rows, width, device=dev, dtype=f64),
                           torch.empty(n_rows, width, device=dev, dtype=f64))
    args, consts = _kernel_args(y1, w2p, y2, tiling, bn1, stride, dilation, stats)
    launch_fixed(_grouped_conv_bn_stats_kernel, (n_rows * tiling.n_tiles,), args, {**consts, "BLOCK_P": bp}, 4, 2)
    return stats


__all__ = ["block_p", "grouped_conv_bn_stats"]
