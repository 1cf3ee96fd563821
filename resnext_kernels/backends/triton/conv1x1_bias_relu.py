"""K1: conv1 (1x1) + bias + ReLU as a GEMM over NHWC pixels -> t1; with
RESIDUAL, the split path's K2b: conv3 + bias + identity shortcut + ReLU -> y.

    out[m, j] = relu(sum_k x[m, k] * w[k, j] + b[j] (+ r[m, j])),   m = (n, h, w) pixel

K1 (x, w1p, b1p -> t1): the output channels are the *packed* channels of
packing.py (each group padded to d_p channels), so K2 reads a width tile of t1
as one contiguous slice. The padded channels have zero weights and bias and
come out as exact zeros.
K2b (t2, w3p, b3p, r = x -> y): the same GEMM over the packed t2 channels
(zero rows of w3p for the padding), with the shortcut added in fp32 before the
ReLU and one rounding, as in K2.
"""

import triton
import triton.language as tl

from ...common.sizes import cdiv, next_pow2
from ._common import MAX_SHARED, autotuned, dot_precision, first_kept_config, launch, real_channels, relu


@triton.jit
def _conv1x1_bias_relu_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    M, HW, W, CIN, NOUT, D, REAL_END,
    sxn, sxc, sxh, sxw,
    srm, src, som, soc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RESIDUAL: tl.constexpr, PAD_D_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program computes a [BLOCK_M pixels, BLOCK_N channels] tile of out.

    x_ptr:  x, [N, CIN, H, W] in x's dtype, any strides (channels_last in
            practice); element (n, c, h, w) at n*sxn + c*sxc + h*sxh + w*sxw.
    w_ptr:  w1p (or w3p), [CIN, NOUT] contiguous (row k = input channel,
            column j = output channel).
    b_ptr:  b1p (or b3p), [NOUT] fp32.
    r_ptr:  with RESIDUAL: the shortcut, [M, NOUT] in x's dtype, element
            (m, j) at m*srm + j*src; else unused (any pointer).
    out_ptr: out, [M, NOUT] in x's dtype at m*som + j*soc. Pixel rows, not
            4-D strides: t1 is such a buffer and y, x are channels_last
            contiguous (batch slices too); 4-D addressing kept img/h/w live
            across the K loop and spilled the fp32 128x128x32 tile.
    M = N*H*W pixels in (n, h, w) order; HW = H*W; W: image width (to split
    m into n, h, w for x). Pixel offsets are int64; channel offsets int32
    (c*sxc < CIN: x is channels_last, sxc = 1).
    PAD_D_P: 0, or K1's d_p when out has padded channels (packing.py): then
    channels j that are not real_channels(j, D, REAL_END, PAD_D_P) are
    stored as exact zeros, whatever x holds.
    PREC: tl.dot input_precision ("tf32" or "ieee"; only affects fp32).
    Grid: (cdiv(M, BLOCK_M) * cdiv(NOUT, BLOCK_N),), channel tiles fastest so
    programs sharing an x tile run together.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(NOUT, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < NOUT

    # int64: N*H*W*C can pass 2**31 at large batch.
    m64 = offs_m.to(tl.int64)
    img = m64 // HW
    rem = m64 % HW
    x_row = img * sxn + (rem // W) * sxh + (rem % W) * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < CIN
        a = tl.load(x_ptr + x_row[:, None] + k[None, :] * sxc, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + k[:, None] * NOUT + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)

    mn_mask = m_mask[:, None] & n_mask[None, :]
    acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + m64[:, None] * srm + offs_n[None, :] * src, mask=mn_mask, other=0.0).to(tl.float32)
    out = relu(acc)
    if PAD_D_P:
        out = tl.where(real_channels(offs_n, D, REAL_END, PAD_D_P)[None, :], out, 0.0)
    tl.store(out_ptr + m64[:, None] * som + offs_n[None, :] * soc, out.to(out_ptr.dtype.element_ty), mask=mn_mask)


# Autotune key: the shape, RESIDUAL (K1 or K2b), PREC (the tiles depend on
# it) and, implicitly, the dtypes of the tensor args.
TUNE_KEY = ["M", "CIN", "NOUT", "RESIDUAL", "PREC"]


def _gpu_configs():
    # Hopper-sized GEMM tiles; BLOCK_N = 128/256 covers a whole stage-1/2 width
    # so x is read once. Pruned per shape below. The list is in preference
    # order (_prune keeps it; with autotuning off the first kept config is the
    # one launched, see heuristic_config): first the general-purpose
    # 128x128x64 tile, 8 warps, 3 stages (64 fp32 accumulators per thread,
    # within the unaligned-Cin limit); the later ones are autotune candidates
    # and the first fit where that tile is pruned (width_p <= 64, Cin <= 32,
    # BLOCK_M 64 for "ieee").
    cfgs = []
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, nargs, **kwargs):
    args = {**nargs, **kwargs}
    nout, cin = args["NOUT"], args["CIN"]
    itemsize = args["x_ptr"].dtype.itemsize
    bn_max = max(16, next_pow2(nout))
    bk_max = max(16, next_pow2(cin))

    ieee = args["PREC"] == "ieee" and itemsize == 4
    # Accumulator elements per thread that still compile without spills
    # (ptxas, sm_90a; see bench/triton_compile.py): Cin (or, for K2b, Cout) not a
    # multiple of 16 leaves the x (y, residual) rows unaligned (no vector
    # loads, per-element addresses) and "ieee" fp32 dots run on FMA units
    # with their operands in registers. K1's NOUT (width_p) is always aligned.
    # K2b's residual tile takes as many registers as the accumulator: 128
    # per thread spill (stage 4: 160 bytes for bf16 128x256, 448 for fp32
    # 128x128x32).
    limits = [32 if ieee else 64] if cin % 16 or nout % 16 else []
    if args["RESIDUAL"]:
        limits.append(64)
    acc_limit = min(limits, default=None)

    def fits(c):
        k = c.kwargs
        shared = c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * itemsize  # A and B tiles
        acc_per_thread = k["BLOCK_M"] * k["BLOCK_N"] // (32 * c.num_warps)
        small_enough = (not ieee or k["BLOCK_M"] <= 64) and (acc_limit is None or acc_per_thread <= acc_limit)
        return k["BLOCK_N"] <= bn_max and k["BLOCK_K"] <= bk_max and shared <= MAX_SHARED and small_enough

    kept = [c for c in configs if fits(c)]
    if not kept:  # all tiles larger than the problem: keep the smallest
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept


_CONFIGS = _gpu_configs()  # in preference order; built once
_conv1x1_bias_relu_tuned = autotuned(_conv1x1_bias_relu_kernel, _CONFIGS, TUNE_KEY, _prune)


def heuristic_config(args):
    """K1's config when autotuning is off: the first of _gpu_configs() that
    _prune keeps for `args` (kernel argument name -> value)."""
    return first_kept_config(_CONFIGS, _prune, args)


# Interpreter: one large-tile config (fewer programs = fewer numpy round trips).
_INTERPRET_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}


def _kernel_args(x, weight, bias, out, residual=None, tiling=None):
    """(positional args, constexpr kwargs) of the K1 kernel for these
    tensors; `tiling` (packing.GroupTiling) when out holds t1's packed
    channels, whose padding is then kept at zero."""
    n, cin, h, w = x.shape
    r = out if residual is None else residual  # unread without RESIDUAL
    padded = tiling is not None and tiling.has_padding
    d, real_end = (tiling.d, tiling.groups * tiling.d_p) if padded else (1, 1)
    args = (x, weight, bias, r, out, n * h * w, h * w, w, cin, weight.shape[1], d, real_end, *x.stride(),
            *r.stride(), *out.stride())
    assert out.shape == r.shape == (n * h * w, weight.shape[1])
    consts = {"RESIDUAL": residual is not None, "PAD_D_P": tiling.d_p if padded else 0, "PREC": dot_precision(x.dtype)}
    return args, consts


def conv1x1_bias_relu(x, weight, bias, out, residual=None, tiling=None):
    """Launch K1 (or K2b with `residual`). x [N, Cin, H, W] (strided),
    weight [Cin, Nout], bias [Nout] fp32, out [N*H*W, Nout] (written
    completely) and residual (None or [N*H*W, Nout]): pixel rows (t1's
    buffer, _common.pixel_rows of channels_last y and x). With `tiling`
    (K1: out is t1) its padded channels are stored as zeros."""
    args, consts = _kernel_args(x, weight, bias, out, residual, tiling)
    m, nout = args[5], args[9]

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(nout, meta["BLOCK_N"]),)

    launch(_conv1x1_bias_relu_kernel, _conv1x1_bias_relu_tuned, grid, args, consts, _INTERPRET_CONFIG,
           heuristic_config)
    return out


__all__ = ["conv1x1_bias_relu"]
