"""The `triton` backend: the folded ResNeXt inference block in two launches
(per batch chunk: see bottleneck_inference_triton).

K1 (conv1x1_bias_relu.py): t1 = relu(x @ w1 + b1), a GEMM over NHWC pixels,
    written once in packed channels (packing.py).
K2 (grouped_conv_conv3.py): grouped 3x3 + b2 + ReLU one width tile at a time
    in registers, consumed at once by conv3; + b3 + shortcut (identity or
    projection, same kernel) + ReLU; y stored once.

Algorithm, tiling and config heuristics: docs/triton_backend.md.
"""

import contextlib

import torch

from .. import backends, bench, tuning
# Modules, not their launchers, so the submodule names stay importable.
from . import conv1x1_bias_relu as _k1
from . import grouped_conv_conv3 as _k2
from .packing import cached_pack_weights


def bottleneck_inference_triton(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, *, out=None,
                                batch_chunk=None):
    """y for the folded block; same contract as reference.bottleneck_inference_reference.

    Inputs are validated by ops.check_inputs. x may be channels_last or
    NCHW-contiguous: NCHW is converted to channels_last once here (one copy of
    x, used by both kernels); channels_last input is used in place. Weights
    are packed once and cached (packing.PACK_CACHE). CUDA tensors; CPU tensors
    only under TRITON_INTERPRET=1.

    out: optional preallocated y, [N, Cout, Ho, Wo] channels_last contiguous
    in x's dtype on x's device; every element is overwritten (tests pass a
    NaN-filled one to catch unwritten elements).
    batch_chunk: images per K1/K2 launch pair; None chooses (batch_chunk_for).
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
    if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int)
                                    or batch_chunk < 1):
        raise ValueError(f"batch_chunk must be a positive int or None, got {batch_chunk!r}")
    # Triton launches on the current CUDA device; make it x's device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        tiling, packed = cached_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups)

        def run(chunk):
            # One t1 buffer of `chunk` images, reused by every chunk.
            t1 = torch.empty((chunk * h * w, tiling.width_p), dtype=x.dtype, device=x.device)
            for i0 in range(0, n, chunk):
                xs, ys = x[i0:i0 + chunk], out[i0:i0 + chunk]  # batch slices of NHWC tensors: views
                t1s = t1[:xs.shape[0] * h * w]
                _k1.conv1x1_bias_relu(xs, packed["w1p"], packed["b1p"], t1s)
                _k2.grouped_conv_conv3(t1s, xs, tiling, packed, ys, stride, dilation)

        if batch_chunk is None:
            key = tuning.tune_key(x, w1.shape[0], cout, stride, dilation, groups, wd is not None,
                                  torch.backends.cudnn.allow_tf32)
            batch_chunk = batch_chunk_for(key, x, tiling.width_p, run)
        run(min(batch_chunk, n))
    return out


# Batch chunks. Run on the whole batch, K1 writes all of t1 to DRAM and K2
# reads it back, and K2 reads x again for the identity shortcut: about twice
# the block's bytes floor on stages 1-2. Run chunk by chunk with one reused
# t1 buffer a fraction of L2 in size, the t1 that K2 reads (and, for small
# enough chunks, the x it reads again) may still be in L2, and t1's dirty
# lines are overwritten in L2 rather than written back. Whether that beats
# the extra launches and the smaller grids is for the GPU to say, so the
# chunk size is timed (tuning.select_fastest) among the whole batch and the
# chunks whose t1 takes about 1/8 and 1/4 of L2. Without autotuning, in the
# interpreter and under CUDA graph capture (before a choice is cached): the
# whole batch, two launches.
CHUNK_CHOICES = {}  # tuning.tune_key -> images per launch pair
L2_FRACTIONS = (8, 4)  # t1 of a chunk candidate: about L2 / fraction


def chunk_candidates(n, t1_bytes_per_image, l2_bytes):
    """Images per launch pair to time: the whole batch first, then the
    chunks whose t1 takes about l2_bytes / f (f in L2_FRACTIONS), when smaller
    than the batch."""
    candidates = [n]
    for fraction in L2_FRACTIONS:
        chunk = max(1, l2_bytes // fraction // t1_bytes_per_image)
        if chunk < n and chunk not in candidates:
            candidates.append(chunk)
    return candidates


def batch_chunk_for(key, x, width_p, run):
    """The chunk size for this call: timed on the first call of key
    (run(chunk) runs the block with it), the whole batch where not tuning."""
    n, _, h, w = x.shape
    if not x.is_cuda:  # the interpreter: nothing to time
        return n
    t1_per_image = h * w * width_p * x.element_size()
    return tuning.select_fastest(
        CHUNK_CHOICES, key, lambda: chunk_candidates(n, t1_per_image, bench.cache_bytes(x.device)),
        lambda chunk: tuning.seconds_per_call(lambda: run(chunk), x.device),
        enabled=backends.autotune_enabled(), capturing=tuning.capturing(x.device), default=n)


__all__ = ["bottleneck_inference_triton", "chunk_candidates"]
