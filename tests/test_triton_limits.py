"""The Triton kernels' 64-bit audit, on the host: sizes that their 32-bit
program or weight offsets cannot address are refused with a clear
ValueError before anything is launched (meta tensors: nothing is allocated).
The int64 element offsets themselves are checked by the sm_90a compile of
every kernel (test_triton_configs) and by the GPU tests on >2^31-element
tensors (issue 15)."""

import pytest
import torch
from triton_cases import needs_triton

from resnext_kernels.backends.triton import bottleneck_inference_triton, packing
from resnext_kernels.backends.triton._common import MAX_PIXELS, MAX_WEIGHT_ELEMENTS

pytestmark = needs_triton


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def test_more_pixels_than_int32_program_offsets_is_refused():
    n = MAX_PIXELS // 4 + 1  # N*H*W just over the limit with 2x2 images
    weights = (_meta(8, 16, 1, 1), _meta(8), _meta(8, 4, 3, 3), _meta(8), _meta(16, 8, 1, 1), _meta(16), None, None)
    with pytest.raises(ValueError, match=f"N\\*H\\*W = {4 * n} pixels; the triton backend supports at most"):
        bottleneck_inference_triton(_meta(n, 16, 2, 2), *weights, 1, 1, 2)


def test_packed_weight_of_2_31_elements_is_refused():
    width = 16384  # groups=1: w2p holds 9 * width^2 > 2^31 elements
    with pytest.raises(ValueError, match="the packed weight w2p has 2415919104 elements"):
        packing.pack_weights(_meta(width, 8, 1, 1), _meta(width), _meta(width, width, 3, 3), _meta(width),
                             _meta(8, width, 1, 1), _meta(8), None, None, 1)
    assert 9 * width**2 >= MAX_WEIGHT_ELEMENTS
