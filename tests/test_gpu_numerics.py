"""Full fp32 on the fused GPU backends (marked `cuda`, skipped without a GPU):
with TF32 off (torch.backends.cudnn.allow_tf32 = False, as PyTorch's
convolutions read it) the triton and cuda backends must be as accurate as
eager fp32, so an operand that leaks into TF32 (10 mantissa bits; e.g. the
grouped conv's dots forced to TF32) fails the max-error bound by two orders
of magnitude (tests/test_tolerance.py simulates that leak on CPU: ~1.5e-4
against a bound of ~1.3e-6). The interpreter ignores the dots' precision,
so only a GPU can see it. The mean signed error is bounded too.

Blocks: every grouped-conv packing regime (d = 4: four groups per 16-channel
tile; d = 32: one tile of 32; d = 64; d = 128: a group over two 64-channel
tiles, dilation 2) and a projection with stride 2. GPU time, estimated (not
measured): one compile of K1 and K2 per block in "ieee" mode (1-3 s each),
the kernels and the fp64 CPU reference well under a second: ~30-60 s in all.
"""

import pytest
import torch
from helpers import Block, assert_op_matches_reference

from resnext_kernels.common import settings
from resnext_kernels.ops import inference as ops

pytestmark = pytest.mark.cuda

FP32_BLOCKS = [
    Block(2, 64, 128, 256, 32, 28, 28, stride=2, projection=True),  # d = 4, stride-2 projection
    Block(2, 2048, 1024, 2048, 32, 7, 7),                          # d = 32 (stage 4)
    Block(2, 256, 512, 256, 8, 16, 16),                            # d = 64
    Block(1, 96, 384, 96, 3, 17, 17, dilation=2),                  # d = 128, dilation 2
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("block", FP32_BLOCKS, ids=repr)
def test_fp32_with_tf32_off_is_as_accurate_as_eager(block, backend, allow_tf32, monkeypatch):
    allow_tf32(False)
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    inputs = block.make(torch.float32, "cuda")
    y = ops.bottleneck_inference(*inputs, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                 backend=backend)
    assert y.dtype == torch.float32
    assert_op_matches_reference(y, inputs, block.conv, mean_error=True)
