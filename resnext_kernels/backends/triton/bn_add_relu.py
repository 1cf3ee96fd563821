"""The training block's elementwise tail, forward and its backward reduction.

Forward:  out = relu(bn3(y3) + shortcut),  shortcut = x or bn_d(yd)
    (each BN output rounded to the activation dtype, then the sum rounded,
    then ReLU: eager's bn3 -> add -> relu).

Backward: dz = threshold_backward(grad_out, out, 0), the gradient at bn3's
    output and at the shortcut, written once (every later kernel reads it:
    conv3's dgrad and wgrad, the projection's, and conv1's dgrad for the
    identity shortcut); and per tile and channel the partial sums of BN3's
    (and BN_d's) backward: sum dz, sum dz*xhat3 (, sum dz*xhat_d). dz is
    exactly grad_out or 0, so storing it in the activation dtype is exact.
"""

import torch
import triton
import triton.language as tl

from ...common.sizes import cdiv
from ._bn import bn_apply, bn_grad_sums, load_bn, relu, relu_grad
from ._common import interpreter_pixels, interpreting, launch_fixed


@triton.jit
def _strided_offsets(offs_m, offs_c, HW, W, S_N, S_C, S_H, S_W):
    """Element offsets of pixels offs_m (n * HW + h * W + w) and channels
    offs_c in a [N, C, H, W] tensor of strides (S_N, S_C, S_H, S_W): any
    layout (channels_last, NCHW, an expanded gradient), one division per
    pixel row, none per element."""
    m = offs_m.to(tl.int64)
    img, rem = m // HW, m % HW
    row = img * S_N + (rem // W) * S_H + (rem % W) * S_W
    return row[:, None] + offs_c.to(tl.int64)[None, :] * S_C


@triton.jit
def _bn_add_relu_kernel(
    y3_ptr, s_ptr, out_ptr, stats3_ptr, statsd_ptr, M, C, HW, W, OUT_SN, OUT_SC, OUT_SH, OUT_SW, STATS_STRIDE,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PROJECTION: tl.constexpr, OUT_ROWS: tl.constexpr,
):
    """y3_ptr: [M, C] pixel rows, act dtype. s_ptr: the shortcut's source,
    [M, C] pixel rows: x (identity) or yd (PROJECTION). out_ptr: [N, C, H,
    W] (M = N * HW pixels of width W) written through its strides OUT_*
    (x's memory format), or as [M, C] pixel rows when OUT_ROWS (channels_last:
    the strided offsets cost registers: 608 bytes of spills instead of 16
    at odd_d14 in bf16, bench/triton_compile.py --training). stats3_ptr, statsd_ptr: [STATS_ROWS, C] fp32
    blocks (bn_statistics.py) of BN3 and BN_d (statsd unused for identity).
    Grid: (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_C),)."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    offs_m = (pid // n_c) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    if OUT_ROWS:
        out_off = off
    else:
        out_off = _strided_offsets(offs_m, offs_c, HW, W, OUT_SN, OUT_SC, OUT_SH, OUT_SW)
    dtype = out_ptr.dtype.element_ty

    mean3, _, scale3, beta3 = load_bn(stats3_ptr, STATS_STRIDE, offs_c, c_mask)
    z3 = bn_apply(tl.load(y3_ptr + off, mask=mask, other=0.0), mean3, scale3, beta3, dtype)
    s = tl.load(s_ptr + off, mask=mask, other=0.0)
    if PROJECTION:
        meand, _, scaled, betad = load_bn(statsd_ptr, STATS_STRIDE, offs_c, c_mask)
        s = bn_apply(s, meand, scaled, betad, dtype)
    out = relu((z3.to(tl.float32) + s.to(tl.float32)).to(dtype))
    tl.store(out_ptr + out_off, out, mask=mask)


@triton.jit
def _bn_add_relu_backward_kernel(
    g_ptr, out_ptr, y3_ptr, yd_ptr, dz_ptr, stats3_ptr, statsd_ptr, part_ptr, M, C, HW, W,
    G_SN, G_SC, G_SH, G_SW, OUT_SN, OUT_SC, OUT_SH, OUT_SW, STATS_STRIDE,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PROJECTION: tl.constexpr, G_ROWS: tl.constexpr,
    OUT_ROWS: tl.constexpr,
):
    """g_ptr (grad_out), out_ptr: [N, C, H, W] read through their strides
    (G_*, OUT_*; as pixel rows when G_ROWS / OUT_ROWS); y3_ptr, yd_ptr (PROJECTION), dz_ptr (out): [M, C] pixel
    rows, act dtype. stats*_ptr as in the forward. part_ptr:
    out, [cdiv(M, BLOCK_M), J, C] fp32 with J = 3 (PROJECTION) or 2: this
    tile's sum dz, sum dz*xhat3 (, sum dz*xhat_d), accumulated in fp64.
    Grid: (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_C),)."""
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_m = pid // n_c
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]

    if G_ROWS:
        g = tl.load(g_ptr + off, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + _strided_offsets(offs_m, offs_c, HW, W, G_SN, G_SC, G_SH, G_SW), mask=mask, other=0.0)
    if OUT_ROWS:
        out = tl.load(out_ptr + off, mask=mask, other=0.0)
    else:
        out = tl.load(out_ptr + _strided_offsets(offs_m, offs_c, HW, W, OUT_SN, OUT_SC, OUT_SH, OUT_SW), mask=mask,
                      other=0.0)
    dz = relu_grad(g, out)
    tl.store(dz_ptr + off, dz, mask=mask)
    dz = tl.where(mask, dz.to(tl.float32), 0.0)

    J: tl.constexpr = 3 if PROJECTION else 2
    part = part_ptr + (pid_m * J) * C + offs_c
    mean3, invstd3, _, _ = load_bn(stats3_ptr, STATS_STRIDE, offs_c, c_mask)
    xhat3 = (tl.load(y3_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean3) * invstd3
    sum_dz, sum_dzx3 = bn_grad_sums(dz, xhat3)
    tl.store(part, sum_dz, mask=c_mask)
    tl.store(part + C, sum_dzx3, mask=c_mask)
    if PROJECTION:
        meand, invstdd, _, _ = load_bn(statsd_ptr, STATS_STRIDE, offs_c, c_mask)
        xhatd = (tl.load(yd_ptr + off, mask=mask, other=0.0).to(tl.float32) - meand) * invstdd
        tl.store(part + 2 * C, bn_grad_sums(dz, xhatd)[1], mask=c_mask)


def _pixel_rows(t):
    """Whether [N, C, H, W] tensor t is stored as [N*H*W, C] pixel rows
    (channels_last contiguous; the kernels then index it without strides)."""
    return t.is_contiguous(memory_format=torch.channels_last)


def _tiles(c, backward=False):
    """(BLOCK_M, BLOCK_C): 64 pixels x up to 128 channels on 4 warps; the
    backward 32 pixels (its four fp32 input tiles and fp64 sums spilled 60
    bytes at 64 on sm_90a, bench/triton_compile.py --training). The
    interpreter takes whole rows of up to 256 channels and
    interpreter_pixels() (128) pixels."""
    if interpreting():
        return interpreter_pixels(), max(16, min(256, triton.next_power_of_2(c)))
    return 32 if backward else 64, min(128, max(16, triton.next_power_of_2(c)))


def bn_add_relu(y3, shortcut, out, stats3, statsd):
    """out = relu(bn3(y3) + shortcut): shortcut is x (statsd None) or yd
    (BN_d with statsd). y3, shortcut: [N, C, Ho, Wo] channels_last
    contiguous; out: [N, C, Ho, Wo], any strides (the block's output is in
    x's memory format); stats3/statsd: [STATS_ROWS, C] fp32 views."""
    n, c, ho, wo = y3.shape
    m = n * ho * wo
    bm, bc = _tiles(c)
    args = (y3, shortcut, out, stats3, stats3 if statsd is None else statsd, m, c, ho * wo, wo, *out.stride(),
            stats3.stride(0))
    launch_fixed(_bn_add_relu_kernel, (cdiv(m, bm) * cdiv(c, bc),), args,
                 {"BLOCK_M": bm, "BLOCK_C": bc, "PROJECTION": statsd is not None, "OUT_ROWS": _pixel_rows(out)}, 4,
                 1)
    return out


def bn_add_relu_backward(grad_out, out, y3, yd, dz, stats3, statsd):
    """Writes dz (channels_last contiguous, like y3) and returns the partial
    sums [T, J, C] fp64 (J = 3 with the projection's yd and statsd, else 2);
    see the module docstring. grad_out and out: any strides."""
    n, c, ho, wo = out.shape
    m = n * ho * wo
    bm, bc = _tiles(c, backward=True)
    projection = yd is not None
    part = torch.empty(cdiv(m, bm), 3 if projection else 2, c, device=out.device, dtype=torch.float64)
    args = (grad_out, out, y3, y3 if yd is None else yd, dz, stats3, stats3 if statsd is None else statsd, part, m, c,
            ho * wo, wo, *grad_out.stride(), *out.stride(), stats3.stride(0))
    launch_fixed(_bn_add_relu_backward_kernel, (cdiv(m, bm) * cdiv(c, bc),), args,
                 {"BLOCK_M": bm, "BLOCK_C": bc, "PROJECTION": projection, "G_ROWS": _pixel_rows(grad_out),
                  "OUT_ROWS": _pixel_rows(out)}, 4, 1)
    return part


__all__ = ["bn_add_relu", "bn_add_relu_backward"]
