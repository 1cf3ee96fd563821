"""64-bit indexing on a GPU (marked `cuda`, skipped without one): blocks whose
x, t1 (the block's N*H*W*width intermediate) and y each hold more than 2**31
elements, through the triton (fused and split), cuda and auto backends,
checked against the fp64 reference on whole images at the start, in the
middle, across the 2**31-element boundary and at the end of the batch.

Sized for an H200 (141 GiB), bf16, RESNEXT_KERNELS_AUTOTUNE=0 (autotuning or
timing candidates at this size would only add minutes; the configs and the
dispatch are the same code either way). Estimates, from the sizes and the
H200's ~4.8 TB/s and ~1000 dense bf16 TFLOP/s at an assumed 10-30%
efficiency of the kernels, plus the fp64 reference of four images on the
CPU (measured here: 0.8 s and 2.0 s per image on 2 cores; ~0.2-0.5 s on
the GPU machine's 16):

| case | x | t1 | y | GPU memory | kernels | test |
|---|---|---|---|---|---|---|
| identity | 2.26e9 | 2.26e9 | 2.26e9 | 14 GB (18 GB split) | ~3 TFLOP, ~25 GB moved: ~20-40 ms | ~5-10 s |
| projection | 4.40e9 | 4.40e9 | 2.20e9 | 23 GB | ~5 TFLOP: ~20-50 ms | ~5-10 s |

The test time is Triton compiling its two or three kernels for the shape
(about 1-3 s each, from the sm_90a compile check) and the CPU reference;
the kernels themselves take milliseconds. The tests share an xdist group,
so under the GPU check's `--dist loadgroup` they run one at a time (at most
~25 GB of the GPU's memory at once). None of this has run on a GPU yet.
"""

import pytest
import torch
from helpers import Block, assert_op_matches_reference

from resnext_kernels.backends.triton import bottleneck_inference_triton
from resnext_kernels.common import settings
from resnext_kernels.ops import inference as ops

pytestmark = [pytest.mark.cuda, pytest.mark.xdist_group("gpu_large_tensors")]

INT32_LIMIT = 2**31

# (block, images to check). Identity: stage 2 of ResNeXt-101 32x8d-like
# (256 channels, d = 8) at 56x56, batch 2816; image 2674 straddles element
# 2**31 of x, t1 and y. Projection: the stride-2 stage transition of a
# detection backbone at 800x1344 (a 200x336 map, 256 -> 512 channels) at
# batch 256; image 124 straddles 2**31 in x and t1, image 249 in y.
LARGE_CASES = {
    "identity": (Block(2816, 256, 256, 256, 32, 56, 56), (0, 1407, 2674, 2815)),
    "projection": (Block(256, 256, 256, 512, 32, 200, 336, stride=2, projection=True), (0, 124, 249, 255)),
}
RUNS = [("identity", "triton"), ("identity", "triton_split"), ("identity", "cuda"), ("identity", "auto"),
        ("projection", "triton"), ("projection", "cuda"), ("projection", "auto")]


def _large_inputs(block):
    """[x, w1, ..., bd] in bf16 on the GPU: random weights from Block.make,
    and x drawn in place as an NHWC tensor (no fp64 or CPU copy of it)."""
    weights = Block(1, block.cin, block.width, block.cout, block.groups, 1, 1, projection=block.projection)
    inputs = weights.make(torch.bfloat16, "cuda")
    x = torch.empty(block.n, block.h, block.w, block.cin, dtype=torch.bfloat16, device="cuda").normal_()
    inputs[0] = x.permute(0, 3, 1, 2)  # [N, C, H, W], channels_last
    return inputs


def _free_nan_block(shape):
    """Fill a bf16 tensor of `shape` with NaN and free it: the caching
    allocator hands its memory to the next allocation of that size (y, in
    the cuda backend, which allocates in C++), so unwritten elements stay NaN."""
    torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("case,backend", RUNS, ids=[f"{c}-{b}" for c, b in RUNS])
def test_tensors_over_2_31_elements(case, backend, monkeypatch, poisoned_empty):
    block, images = LARGE_CASES[case]
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    ho, wo = (block.h - 1) // block.stride + 1, (block.w - 1) // block.stride + 1
    y_shape = (block.n, block.cout, ho, wo)
    inputs = _large_inputs(block)
    x = inputs[0]
    for name, elements in (("x", x.numel()), ("t1", block.n * block.h * block.w * block.width),
                           ("y", block.n * block.cout * ho * wo)):
        assert elements > INT32_LIMIT, f"{name} has only {elements} elements"
    _free_nan_block(y_shape)
    if backend == "triton_split":
        y = bottleneck_inference_triton(*inputs, *block.conv, strategy="split")
    else:
        y = ops.bottleneck_inference(*inputs, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                     backend=backend)
    torch.cuda.synchronize()
    assert y.shape == y_shape and y.is_contiguous(memory_format=torch.channels_last)
    for i in images:
        try:
            assert_op_matches_reference(y[i:i + 1], [x[i:i + 1], *inputs[1:]], block.conv, mean_error=True)
        except AssertionError as exc:
            first = i * x[0].numel()
            raise AssertionError(f"image {i} (x elements {first}..{first + x[0].numel()}): {exc}") from exc
