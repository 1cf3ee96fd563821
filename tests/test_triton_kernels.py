"""The Triton backend's correctness against the fp64 reference (interpreter on
CPU): every packing regime, odd shapes, NCHW input, the out= argument, the
TF32 flag, opcheck, the module, and the refusal of CPU tensors without the
interpreter."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import Block, assert_close_to_reference, assert_same_arithmetic, randomize_norms
from triton_cases import (
    DEVICE,
    DTYPES,
    HAS_CUDA,
    REPO_ROOT,
    _check_block,
    _fp64_cpu,
    needs_triton,
)

from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.backends.triton import (
    _common,
    bottleneck_inference_triton,
    packing,
)
from resnext_kernels.ops import inference

pytestmark = needs_triton


# Interpreter-sized blocks covering every packing regime: d = 1, 4, 8, 14
# (d_p <= 16: several groups per 16-channel block-diagonal tile), d = 24, 40,
# 64 (one group per tile, padded to d_p = GT), d = 128 (group spans two 64-wide
# tiles: the input-chunk sweep); Cin/Cout not multiples of 16, odd H/W, stride
# 2 on odd sizes, dilation 2, batch 1, a 1xW image, identity and projection.
CPU_BLOCKS = [
    Block(2, 32, 64, 32, 16, 9, 9),                                  # d=4, s1-like
    Block(2, 24, 32, 40, 8, 9, 9, projection=True),                  # d=4, s1_first-like
    Block(1, 48, 64, 72, 8, 9, 7, stride=2, projection=True),        # d=8, stride 2 on odd sizes
    Block(2, 20, 16, 20, 16, 7, 7),                                  # d=1
    Block(1, 28, 28, 28, 2, 7, 9, dilation=2),                       # d=14, dilation 2
    Block(1, 20, 48, 36, 2, 7, 7, stride=2, projection=True),        # d=24 -> d_p=32
    Block(1, 24, 80, 24, 2, 5, 7),                                   # d=40 -> d_p=64
    Block(1, 36, 128, 36, 2, 7, 7, dilation=2),                      # d=64
    Block(1, 24, 256, 40, 2, 5, 5, stride=2, projection=True),       # d=128: KCH=2
    Block(1, 16, 32, 24, 4, 1, 3, stride=2, projection=True),        # 1x3 image, padding only
    Block(2, 16, 32, 32, 4, 9, 9, stride=2, dilation=2, projection=True),  # stride 2 + dilation 2
]


@pytest.mark.parametrize("dtype,tf32", DTYPES)
@pytest.mark.parametrize("block", CPU_BLOCKS, ids=repr)
def test_blocks_match_fp64_reference(block, dtype, tf32, allow_tf32, poisoned_empty):
    _check_block(block, dtype, tf32, DEVICE, allow_tf32, poisoned_empty)


@pytest.mark.parametrize("max_gt", [16, 32])
@pytest.mark.parametrize("block", [
    Block(1, 24, 128, 40, 2, 5, 5, stride=2, projection=True),  # d=64 in 4 or 2 chunks
    Block(1, 20, 48, 20, 2, 5, 7),                              # d=24 (d_p=32) in 2 or 1 chunks
], ids=repr)
def test_group_split_across_tiles(block, max_gt, monkeypatch, allow_tf32, poisoned_empty):
    """d > GT: every output tile must sweep all input chunks of its group
    (a kernel reading only its own tile passes d <= 16 and fails here)."""
    monkeypatch.setattr(packing, "MAX_GT", max_gt)
    packing.PACK_CACHE.clear()  # entries packed with another GT must not be reused
    try:
        tiling = packing.GroupTiling(block.width, block.groups)
        assert tiling.gt == min(max_gt, tiling.d_p) and tiling.kch == tiling.d_p // tiling.gt
        _check_block(block, torch.float32, False, DEVICE, allow_tf32, poisoned_empty)
    finally:
        packing.PACK_CACHE.clear()


def test_nchw_input_and_op_wrapper(allow_tf32):
    """Through inference.bottleneck_inference(backend="triton"): NCHW-contiguous and
    channels_last inputs give the same, correct output, each in its input's
    memory format; the two the same arithmetic (helpers.assert_same_arithmetic:
    bitwise on a GPU, within BLAS's last bits on CPU)."""
    allow_tf32(False)
    block = Block(2, 24, 32, 40, 8, 7, 9, stride=2, projection=True)
    inputs = block.make(torch.float32, DEVICE, channels_last=False)
    assert inputs[0].is_contiguous()
    kwargs = dict(stride=block.stride, dilation=block.dilation, groups=block.groups, backend="triton")
    y_nchw = inference.bottleneck_inference(*inputs, **kwargs)
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    y_cl = inference.bottleneck_inference(*inputs, **kwargs)
    assert y_nchw.is_contiguous() and not y_nchw.is_contiguous(memory_format=torch.channels_last)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    assert_same_arithmetic(y_nchw, y_cl, "NCHW vs channels_last x")
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    eager = bottleneck_inference_reference(*inputs, *block.conv)
    assert_close_to_reference(y_nchw.cpu(), expected, eager.cpu())


def test_out_argument_is_written_completely(allow_tf32):
    allow_tf32(False)
    block = Block(1, 16, 32, 24, 4, 5, 7, projection=True)
    inputs = block.make(torch.float32, DEVICE)
    out = torch.full((1, 24, 5, 7), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = bottleneck_inference_triton(*inputs, *block.conv, out=out)
    assert y is out
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    assert_close_to_reference(y.cpu(), expected, bottleneck_inference_reference(*inputs, *block.conv).cpu())
    with pytest.raises(ValueError, match="out must be"):
        bottleneck_inference_triton(*inputs, *block.conv, out=torch.empty(1, 24, 5, 7, device=DEVICE))


def test_tf32_flag_read_at_call_time(allow_tf32):
    allow_tf32(True)
    assert _common.dot_precision(torch.float32) == "tf32"
    allow_tf32(False)
    assert _common.dot_precision(torch.float32) == "ieee"
    assert _common.dot_precision(torch.float16) == "tf32"  # no effect on 16-bit dots


def test_opcheck(allow_tf32):
    allow_tf32(False)
    block = Block(1, 16, 32, 24, 4, 5, 5, stride=2, projection=True)
    inputs = block.make(torch.float32, DEVICE)
    torch.library.opcheck(
        torch.ops.resnext_kernels.bottleneck_inference.default,
        (*inputs, *block.conv, "triton"),
    )


def test_fused_module_triton_backend(allow_tf32):
    """FusedResNeXtBlock(..., backend="triton") runs (on CPU tensors under the interpreter)."""
    allow_tf32(False)
    down = torch.nn.Sequential(torch.nn.Conv2d(24, 32, 1, stride=2, bias=False), torch.nn.BatchNorm2d(32))
    block = FusedResNeXtBlock(24, 8, stride=2, downsample=down, groups=4, base_width=16, backend="triton")
    randomize_norms(block).eval()
    x = torch.randn(2, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = block.to(DEVICE)(x.to(DEVICE))
        block.backend = "reference"
        eager = block.cpu()(x)
        expected = block.double()(x.double())
    assert_close_to_reference(y.cpu(), expected, eager)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error outside the interpreter; this machine has CUDA")
def test_cpu_tensors_rejected_without_interpreter():
    code = (
        "import torch, resnext_kernels as rk\n"
        "x = torch.randn(1, 4, 3, 3)\n"
        "w1, w2, w3, b = torch.randn(4, 4, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(4, 4, 1, 1), torch.randn(4)\n"
        "try:\n"
        "    rk.bottleneck_inference(x, w1, b, w2, b, w3, b, backend='triton')\n"
        "except rk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr
