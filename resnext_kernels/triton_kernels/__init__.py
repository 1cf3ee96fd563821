"""The `triton` backend: the folded ResNeXt inference block in two launches.

K1 (conv1x1_bias_relu.py): t1 = relu(x @ w1 + b1), a GEMM over NHWC pixels,
    written once in packed channels (packing.py).
K2 (grouped_conv_conv3.py): grouped 3x3 + b2 + ReLU one width tile at a time
    in registers, consumed at once by conv3; + b3 + shortcut (identity or
    projection, same kernel) + ReLU; y stored once.

Algorithm, tiling and config heuristics: docs/triton_backend.md.
"""

import contextlib

import torch

from .. import backends
# Modules, not their launchers, so the submodule names stay importable.
from . import conv1x1_bias_relu as _k1
from . import grouped_conv_conv3 as _k2
from .packing import cached_pack_weights


def bottleneck_inference_triton(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, *, out=None):
    """y for the folded block; same contract as reference.bottleneck_inference_reference.

    Inputs are validated by ops.check_inputs. x may be channels_last or
    NCHW-contiguous: NCHW is converted to channels_last once here (one copy of
    x, used by both kernels); channels_last input is used in place. Weights
    are packed once and cached (packing.PACK_CACHE). CUDA tensors; CPU tensors
    only under TRITON_INTERPRET=1.

    out: optional preallocated y, [N, Cout, Ho, Wo] channels_last contiguous
    in x's dtype on x's device; every element is overwritten (tests pass a
    NaN-filled one to catch unwritten elements).
    Returns y, [N, Cout, Ho, Wo] channels_last contiguous, x's dtype.
    """
    backends.resolve_backend("triton", x.device)  # raises with the reason if unusable
    x = x.contiguous(memory_format=torch.channels_last)  # no-op for channels_last input
    n, _, h, w = x.shape
    cout = w3.shape[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if out is None:
        out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif (
        tuple(out.shape) != (n, cout, ho, wo)
        or out.dtype != x.dtype
        or out.device != x.device
        or not out.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError(
            f"out must be a channels_last {x.dtype} tensor of shape {(n, cout, ho, wo)} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    # Triton launches on the current CUDA device; make it x's device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        tiling, packed = cached_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups)
        t1 = torch.empty((n * h * w, tiling.width_p), dtype=x.dtype, device=x.device)
        _k1.conv1x1_bias_relu(x, packed["w1p"], packed["b1p"], t1)
        _k2.grouped_conv_conv3(t1, x, tiling, packed, out, stride, dilation)
    return out


__all__ = ["bottleneck_inference_triton"]
