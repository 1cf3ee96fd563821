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
def tile_mean_m2(v, rows_valid, cnt):
    """Per-column (mean, M2) of the fp32 tile v [ROWS, C] over its valid rows
    (rows_valid [ROWS]; cnt of them, fp32): two passes in registers."""
    v = tl.where(rows_valid[:, None], v, 0.0)
    mean = tl.sum(v, 0) / cnt
    dev = tl.where(rows_valid[:, None], v - mean[None, :], 0.0)
    return mean, tl.sum(dev * dev, 0)


@triton.jit
def real_channel(q, D, D_P, GROUPS):
    """(real channel, valid) of packed channel q (packing.py: group g = q // D_P
    padded to D_P channels); padding channels and padding groups are invalid."""
    g = q // D_P
    i = q % D_P
    return g * D + i, (i < D) & (g < GROUPS)
