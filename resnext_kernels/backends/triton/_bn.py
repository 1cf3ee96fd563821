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
    statistics b = c = 0."""
    return (a * dz.to(tl.float32) + b * (y.to(tl.float32) - mean) + c).to(dtype)


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


@triton.jit
def real_channel(q, D, D_P, GROUPS):
    """(real channel, valid) of packed channel q (packing.py: group g = q // D_P
    padded to D_P channels); padding channels and padding groups are invalid."""
    g = q // D_P
    i = q % D_P
    return g * D + i, (i < D) & (g < GROUPS)
