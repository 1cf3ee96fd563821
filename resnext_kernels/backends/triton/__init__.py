"""The `triton` backend: the folded ResNeXt inference block in two launches
(per batch chunk), or three on the split path (see bottleneck_inference_triton).

K1 (conv1x1_bias_relu.py): t1 = relu(x @ w1 + b1), a GEMM over NHWC pixels,
    written once in packed channels (packing.py).
K2 (grouped_conv_conv3.py): grouped 3x3 + b2 + ReLU one width tile at a time
    in registers, consumed at once by conv3; + b3 + shortcut (identity or
    projection, same kernel) + ReLU; y stored once. "fused" strategy.
"split" strategy, identity blocks only: K2a (grouped_conv_bias_relu.py)
    t2 = relu(grouped 3x3 + b2) written once, then K2b (K1's kernel with
    RESIDUAL) y = relu(t2 @ w3 + b3 + x): no grouped-conv recompute per Cout
    tile, for one write and one read of t2.

Algorithm, tiling and config heuristics: docs/triton_backend.md.
"""

import contextlib

import torch

from ...common import settings, timing, tuning, tuning_store
from ...common.layout import output_memory_format
from ...common.sizes import conv_output_size

# Modules, not their launchers, so the submodule names stay importable.
from . import conv1x1_bias_relu as _k1
from . import grouped_conv_bias_relu as _k2a
from . import grouped_conv_conv3 as _k2
from ._common import MAX_PIXELS, nhwc_view, pixel_rows
from .packing import cached_pack_weights

STRATEGIES = ("fused", "split")


def bottleneck_inference_triton(x, w1, b1, w2, b2, w3, b3, wd, bd, stride, dilation, groups, *, out=None,
                                strategy=None, batch_chunk=None):
    """y for the folded block; same contract as reference.bottleneck_inference_reference.

    The op (ops/inference.py) validated the inputs and checked that triton
    can run on x's device before calling this; it does neither again. x may
    be channels_last or NCHW-contiguous (or strided): the kernels read a
    channels_last x, so any other x is converted once here (one copy of x,
    used by both kernels). y is written directly in x's memory format
    (common.layout.output_memory_format) through its strides. Weights are
    packed once and cached (packing.PACK_CACHE). CUDA tensors; CPU tensors
    only under TRITON_INTERPRET=1. Raises ValueError for sizes the kernels'
    32-bit program offsets cannot address (_common.MAX_PIXELS pixels).

    out: optional preallocated y, [N, Cout, Ho, Wo] contiguous in that
    memory format, in x's dtype on x's device; every element is overwritten
    (tests pass a NaN-filled one to catch unwritten elements).
    strategy: "fused" (K1, K2), "split" (K1, K2a, K2b; identity blocks with
    a channels_last x only: K2b writes y as pixel rows) or None;
    batch_chunk: images per launch sequence, or None. Both None:
    chosen (choose_candidate); either given: no timing, and the other one
    is "fused" / the whole batch.
    Returns y, [N, Cout, Ho, Wo] in x's memory format, x's dtype.
    """
    x_in, y_format = x, output_memory_format(x)
    x = x.contiguous(memory_format=torch.channels_last)  # no-op for channels_last input
    n, _, h, w = x.shape
    cout = w3.shape[0]
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    if n * h * w > MAX_PIXELS:
        raise ValueError(f"x has N*H*W = {n * h * w} pixels; the triton backend supports at most {MAX_PIXELS} "
                         "(32-bit program offsets); split the batch")
    if out is None:
        out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=y_format)
    elif (
        tuple(out.shape) != (n, cout, ho, wo)
        or out.dtype != x.dtype
        or out.device != x.device
        or not out.is_contiguous(memory_format=y_format)
    ):
        raise ValueError(
            f"out must be a {y_format} {x.dtype} tensor of shape {(n, cout, ho, wo)} on {x.device} (x's memory "
            f"format), got {out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}"
        )
    if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int)
                                    or batch_chunk < 1):
        raise ValueError(f"batch_chunk must be a positive int or None, got {batch_chunk!r}")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    identity = wd is None
    if strategy == "split" and not identity:
        raise ValueError("strategy='split' is for identity blocks only (stride 1, Cin == Cout); "
                         "this block has a projection shortcut")
    # K2b writes y as pixel rows: the split path needs a channels_last y.
    splittable = identity and y_format == torch.channels_last
    if strategy == "split" and not splittable:
        raise ValueError("strategy='split' writes y as pixel rows: it needs a channels_last x (this x gives an "
                         "NCHW y); use 'fused'")
    # Triton launches on the current CUDA device; make it x's device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        tiling, packed = cached_pack_weights(w1, b1, w2, b2, w3, b3, wd, bd, groups)

        def run(candidate):
            strategy, chunk = candidate
            # One t1 buffer (and, split, one t2 buffer) of `chunk` images, reused by every chunk.
            t1 = torch.empty((chunk * h * w, tiling.width_p), dtype=x.dtype, device=x.device)
            t2 = None
            if strategy == "split":
                t2 = torch.empty((chunk * ho * wo, tiling.width_p), dtype=x.dtype, device=x.device)
            for i0 in range(0, n, chunk):
                xs, ys = x[i0:i0 + chunk], out[i0:i0 + chunk]  # batch slices: views
                c = xs.shape[0]
                t1s = t1[:c * h * w]
                _k1.conv1x1_bias_relu(xs, packed["w1p"], packed["b1p"], t1s, tiling=tiling)
                if t2 is None:
                    _k2.grouped_conv_conv3(t1s, xs, tiling, packed, ys, stride, dilation)
                else:
                    t2s = nhwc_view(t2[:c * ho * wo], c, ho, wo)
                    _k2a.grouped_conv_bias_relu(nhwc_view(t1s, c, h, w), tiling, packed, t2s, stride, dilation)
                    _k1.conv1x1_bias_relu(t2s, packed["w3p"], packed["b3p"], pixel_rows(ys), residual=pixel_rows(xs))

        if strategy is None and batch_chunk is None:
            # x's own layout: it decides y's format (NCHW y is stored strided).
            key = tuning.tune_key(x_in, w1.shape[0], cout, stride, dilation, groups, not identity,
                                  torch.backends.cudnn.allow_tf32)
            strategy, batch_chunk = choose_candidate(key, x, tiling.width_p, splittable, run)
        run((strategy or "fused", min(batch_chunk or n, n)))
    return out


# Candidates (strategy, images per chunk), timed on the first call of each
# problem (tuning.select_fastest) because which is fastest depends on L2 and
# launch behaviour that cannot be predicted here.
#
# Batch chunks. Run on the whole batch, K1 writes all of t1 to DRAM and K2
# reads it back, and K2 reads x again for the identity shortcut: about twice
# the block's bytes floor on stages 1-2. Run chunk by chunk with one reused
# t1 buffer a fraction of L2 in size, the t1 that K2 reads (and, for small
# enough chunks, the x it reads again) may still be in L2, and t1's dirty
# lines are overwritten in L2 rather than written back. Candidates: the whole
# batch and the chunks whose intermediates take about 1/8 and 1/4 of L2.
#
# Split. K2 recomputes the grouped conv once per Cout tile (8x on stage 4,
# ~46% extra FLOPs); the split path computes t2 once and pays a write and a
# read of t2 instead. Identity blocks only (stride 1, Cin == Cout): K2b adds
# x as it is; a projection shortcut would need a second GEMM in K2b, so
# projection blocks always run fused.
#
# Without autotuning, in the interpreter and under CUDA graph capture (before
# a choice is cached): ("fused", whole batch), two launches.
CHOICES = {}  # tuning.tune_key -> (strategy, images per chunk)
L2_FRACTIONS = (8, 4)  # intermediates of a chunk candidate: about L2 / fraction


def chunk_candidates(n, bytes_per_image, l2_bytes):
    """Images per chunk to time: the whole batch first, then the chunks
    whose intermediates (bytes_per_image each) take about l2_bytes / f
    (f in L2_FRACTIONS), when smaller than the batch."""
    found = [n]
    for fraction in L2_FRACTIONS:
        chunk = max(1, l2_bytes // fraction // bytes_per_image)
        if chunk < n and chunk not in found:
            found.append(chunk)
    return found


def candidates(n, t1_bytes_per_image, l2_bytes, splittable):
    """(strategy, chunk) pairs to time: "fused" over the chunk candidates
    for t1, then, when `splittable` (an identity block with a channels_last
    y), "split" over those for t1 + t2 (t2 is as large as t1 at stride 1)."""
    found = [("fused", c) for c in chunk_candidates(n, t1_bytes_per_image, l2_bytes)]
    if splittable:
        found += [("split", c) for c in chunk_candidates(n, 2 * t1_bytes_per_image, l2_bytes)]
    return found


def choose_candidate(key, x, width_p, splittable, run):
    """(strategy, chunk) for this call: timed on the first call of key
    (run(candidate) runs the block with it) unless the tuning store has it
    (choice "triton"), ("fused", whole batch) where not tuning."""
    n, _, h, w = x.shape
    if not x.is_cuda:  # the interpreter: nothing to time
        return "fused", n
    t1_per_image = h * w * width_p * x.element_size()
    return tuning.select_fastest(
        CHOICES, key, lambda: candidates(n, t1_per_image, timing.cache_bytes(x.device), splittable),
        lambda c: tuning.seconds_per_call(lambda: run(c), x.device),
        enabled=settings.autotune_enabled(), capturing=tuning.capturing(x.device), default=("fused", n),
        choice="triton", validity=lambda: tuning_store.validity(x.device))


__all__ = ["bottleneck_inference_triton", "candidates", "chunk_candidates"]
