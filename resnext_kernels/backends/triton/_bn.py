"""Device helpers of the training kernels (no kernels here): BatchNorm +
ReLU as a prologue, its gradient, ReLU's mask, the per-tile statistics, and
the real channel of a packed grouped-conv channel.

Every helper works on fp32 registers and rounds where eager PyTorch rounds
(to the activation dtype `dtype`), so that the values fed to a `tl.dot` are
the values eager's next op would see.

NaN/Inf: ReLU is written as where(v <= 0, 0, v), never max(v, 0), so a NaN
stays NaN as in torch.relu; ReLU's gradient is threshold_backward's rule on
the output, where(t <= 0, 0, g): zero at exactly 0, and a NaN output passes
the gradient through, as eager does.
"""

import triton
import triton.language as tl


@triton.jit
def bn_apply(y, mean, scale, beta, dtype: tl.constexpr):
    """BatchNorm's output (y - mean) * scale + beta, rounded to dtype.

    y [.., C] in any float type; mean, scale (gamma * invstd), beta: fp32
    per-channel vectors already broadcast. The centered form keeps full
    precision when |mean| >> std (y * scale + shift would cancel)."""
    return ((y.to(tl.float32) - mean) * scale + beta).to(dtype)


@triton.jit
def relu(z):
    """torch.relu: NaN stays NaN (a max(z, 0) could return 0 for it)."""
    return tl.where(z <= 0, tl.zeros_like(z), z)


@triton.jit
def bn_relu(y, mean, scale, beta, dtype: tl.constexpr):
    """relu(BatchNorm(y)) in dtype, as eager's bn -> relu computes it."""
    return relu(bn_apply(y, mean, scale, beta, dtype))


@triton.jit
def relu_grad(g, z):
    """threshold_backward(g, relu(z), 0): g where the ReLU output is > 0 or
    NaN, else 0. relu(z) <= 0 exactly when z <= 0 (z rounded as eager's)."""
    return tl.where(z <= 0, tl.zeros_like(g), g)


@triton.jit
def bn_grad_input(dz, y, mean, a, b, c, dtype: tl.constexpr):
    """BatchNorm's input gradient dy = a*dz + b*(y - mean) + c, rounded to dtype.

    With batch statistics a = gamma*invstd, b = -a*invstd*sum(dz*xhat)/n,
    c = -a*sum(dz)/n (bn_statistics.backward_coefficients); with running
    statistics b = c = 0, and then the y term is left out rather than
    multiplied by 0, as eager's BN backward has no such term: an infinite
    y (or, in the inference op's backward, which passes dz as y, an
    infinite dz) must not turn 0 * inf into NaN where eager carries inf."""
    xhat_term = tl.where(b == 0.0, 0.0, b * (y.to(tl.float32) - mean))
    return (a * dz.to(tl.float32) + xhat_term + c).to(dtype)


@triton.jit
def tile_mean_m2(y, rows_valid, cnt):
    """Per-column (mean, M2) of the tile y [ROWS, C] (the rounded conv output)
    over its valid rows (rows_valid [ROWS]; cnt of them), two passes in
    registers, in fp64: the normalization (invstd) and BN's parameter
    gradients are sensitive to the statistics' last bits (measured: fp32
    tile sums gave invstd ~3x eager-on-CPU's error, which sums in double)."""
    v = tl.where(rows_valid[:, None], y.to(tl.float64), 0.0)
    mean = tl.sum(v, 0) / cnt
    dev = tl.where(rows_valid[:, None], v - mean[None, :], 0.0)
    return mean, tl.sum(dev * dev, 0)


@triton.jit
def bn_grad_sums(dz, xhat):
    """Per-column (sum dz, sum dz*xhat) of a tile (dz zero in masked
    entries), accumulated in fp64. BatchNorm's backward divides them by n
    and applies the result to every element: an fp32 sum's cancellation
    error would shift all gradients of a channel coherently, and the next
    norm's sums would add that shift n times over (measured: 9x eager-on-CPU's
    error at bn1 of a three-norm block in fp32)."""
    dz64 = dz.to(tl.float64)
    return tl.sum(dz64, 0), tl.sum(dz64 * xhat.to(tl.float64), 0)


# A norm's per-channel stats block [STATS_ROWS, C] fp32, rows MEAN, INVSTD,
# SCALE (gamma * invstd), BETA, COUNT (common/batch_stats.py) at row stride
# STATS_STRIDE: written by bn_statistics' finalize / restore, read by every
# kernel that applies or differentiates the norm.


@triton.jit
def load_bn(stats_ptr, STATS_STRIDE, cols, col_ok):
    """(mean, invstd, scale, beta) of the stats block at columns `cols`
    (col_ok: the real ones), each [1, len(cols)] to broadcast over pixel
    rows. A row the caller does not use is dead code to the compiler."""
    mean = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)[None, :]
    invstd = tl.load(stats_ptr + STATS_STRIDE + cols, mask=col_ok, other=0.0)[None, :]
    scale = tl.load(stats_ptr + 2 * STATS_STRIDE + cols, mask=col_ok, other=0.0)[None, :]
    beta = tl.load(stats_ptr + 3 * STATS_STRIDE + cols, mask=col_ok, other=0.0)[None, :]
    return mean, invstd, scale, beta


@triton.jit
def store_bn(stats_ptr, STATS_STRIDE, cols, col_ok, mean, invstd, n, weight_ptr, bias_ptr,
             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Writes the stats block at columns `cols` (fp32 vectors mean, invstd;
    scalar count n): scale = gamma * invstd and beta from the affine
    parameters (any float type; gamma 1 and beta 0 without them)."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.zeros_like(invstd)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(stats_ptr + cols, mean, mask=col_ok)
    tl.store(stats_ptr + STATS_STRIDE + cols, invstd, mask=col_ok)
    tl.store(stats_ptr + 2 * STATS_STRIDE + cols, scale, mask=col_ok)
    tl.store(stats_ptr + 3 * STATS_STRIDE + cols, beta, mask=col_ok)
    tl.store(stats_ptr + 4 * STATS_STRIDE + cols, tl.zeros_like(invstd) + n, mask=col_ok)


@triton.jit
def store_relu_bn_grad(dz_ptr, off, g, y, mean, invstd, scale, beta, mask, dtype: tl.constexpr):
    """The backward through relu(bn(y)) up to BatchNorm's sums: stores dz =
    threshold_backward(g, relu(bn(y))) in dtype at dz_ptr + off (exactly g
    or 0) and returns the per-column (sum dz, sum dz*xhat) over the tile's
    `mask`ed entries, in fp64 (bn_grad_sums). The store's pointers are
    formed at the store and dz is stored before the sums, so neither tile
    stays live longer than needed (a caller-formed pointer tile cost 108
    more bytes of spills in conv1x1_dgrad at odd_d14)."""
    dz = relu_grad(g, bn_apply(y, mean, scale, beta, dtype)).to(dtype)
    tl.store(dz_ptr + off, dz, mask=mask)
    dz = tl.where(mask, dz.to(tl.float32), 0.0)
    xhat = (y.to(tl.float32) - mean) * invstd
    return bn_grad_sums(dz, xhat)


@triton.jit
def real_channel(q, D, D_P, GROUPS):
    """(real channel, valid) of packed channel q (packing.py: group g = q // D_P
    padded to D_P channels); padding channels and padding groups are invalid."""
    g = q // D_P
    i = q % D_P
    return g * D + i, (i < D) & (g < GROUPS)
