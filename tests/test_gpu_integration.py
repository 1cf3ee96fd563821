"""The fused GPU backends through the public API (marked `cuda`, skipped
without a GPU): torch.compile and autograd through a FusedResNeXtBlock, a
whole converted resnext50_32x4d against eager torchvision, and tensors on a
non-default device (cuda:1, with two GPUs). Each check also runs on CPU with
the reference backend, so the checking code itself is tested here.

All compare with float64 on CPU, eager PyTorch at the same dtype and device
setting the tolerance (helpers.assert_close_to_reference: max error and, for
outputs of >= 4096 elements, mean signed error). GPU time, estimated (not
measured): compile+backward ~10-30 s per backend (Inductor compiling the
BN folding and the backward graph; Triton compiling K1/K2 once), the whole
model ~20-40 s with triton (K1/K2 for 8 distinct block shapes, 1-3 s a
compile) and a few seconds with cuda or auto (plus a ~2-5 s fp64 CPU
reference), the cuda:1 test ~10 s per backend where it runs.
"""

import copy

import pytest
import torch
import torchvision
from helpers import Block, assert_close_to_reference, assert_op_matches_reference, randomize_norms
from torch import nn
from torchvision.models.resnet import Bottleneck

import resnext_kernels as rk
from resnext_kernels.common import settings
from resnext_kernels.ops import inference as ops

CL = torch.channels_last


def _on(device, backends):
    """pytest params (backend, device): on CPU the reference backend (it runs
    everywhere: the test's checking code), on CUDA `backends` (marked cuda)."""
    return [pytest.param("reference", "cpu", id="reference-cpu")] + [
        pytest.param(b, device, id=f"{b}-{device}", marks=pytest.mark.cuda) for b in backends]


def _projection_bottleneck():
    """A torchvision Bottleneck with a stride-2 projection: Cin 64, width 64
    (8 groups of d = 8), Cout 128; random BN statistics and affine params."""
    downsample = nn.Sequential(nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    return randomize_norms(Bottleneck(64, 32, 2, downsample, groups=8, base_width=16)).eval()


def _step(module, x, grad_y, device, dtype, compile_backend=None):
    """Forward and backward of `module` (compiled with compile_backend if
    given) on x: (y, x.grad, {parameter name: grad})."""
    run = module if compile_backend is None else torch.compile(module, fullgraph=True, backend=compile_backend)
    x = x.to(device, dtype).contiguous(memory_format=CL).requires_grad_(True)
    y = run(x)
    y.backward(grad_y.to(device, dtype))
    return y, x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend,device", _on("cuda", ["triton", "cuda"]))
def test_compiled_block_forward_and_backward(backend, device, allow_tf32):
    """torch.compile(fullgraph=True) of a FusedResNeXtBlock in fp32 (TF32
    off): its output, the input's gradient and every parameter's gradient
    (conv weights and BN affine params, through the differentiable folding)
    against torchvision's block. Inductor on the GPU; aot_eager on CPU."""
    allow_tf32(False)
    tv = _projection_bottleneck()
    torch._dynamo.reset()
    fused = rk.FusedResNeXtBlock.from_bottleneck(tv, backend=backend).to(device).eval()
    x, grad_y = torch.randn(2, 64, 15, 15), torch.randn(2, 128, 8, 8)
    expected = _step(copy.deepcopy(tv).double(), x, grad_y, "cpu", torch.float64)
    eager = _step(copy.deepcopy(tv).to(device), x, grad_y, device, torch.float32)
    got = _step(fused, x, grad_y, device, torch.float32, "inductor" if device == "cuda" else "aot_eager")
    for name, g, e, ref in (("y", got[0], eager[0], expected[0]), ("x.grad", got[1], eager[1], expected[1])):
        try:
            assert_close_to_reference(g.detach().cpu(), ref, e.detach().cpu(), mean_error=True)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    assert got[2].keys() == expected[2].keys()
    for name, ref in expected[2].items():
        try:
            assert_close_to_reference(got[2][name].cpu(), ref, eager[2][name].cpu())
        except AssertionError as exc:
            raise AssertionError(f"{name}.grad: {exc}") from exc


@pytest.mark.parametrize("backend,device", _on("cuda", ["triton", "cuda", "auto"]))
def test_converted_resnext50_matches_eager(backend, device, monkeypatch):
    """torchvision's resnext50_32x4d (random BN statistics; fc removed so the
    2048 pooled features per image are compared) converted with `backend`,
    bf16 channels_last, against eager torchvision in bf16. On the GPU with
    RESNEXT_KERNELS_AUTOTUNE=0 (each kernel's heuristic config; auto then
    runs cuda through auto's dispatch); on CPU a smaller input."""
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "0")
    tv = randomize_norms(torchvision.models.resnext50_32x4d()).eval()
    tv.fc = nn.Identity()
    x = torch.randn(4, 3, 112, 112) if device == "cuda" else torch.randn(2, 3, 64, 64)
    fused = rk.convert(copy.deepcopy(tv), backend=backend)
    assert sum(isinstance(m, rk.FusedResNeXtBlock) for m in fused.modules()) == 16
    assert fused.resnext_kernels_skipped == {}

    def run(model, dtype):
        model = model.to(device, dtype).to(memory_format=CL)
        with torch.no_grad():
            return model(x.to(device, dtype).contiguous(memory_format=CL)).cpu()

    with torch.no_grad():
        expected = copy.deepcopy(tv).double()(x.double())
    assert_close_to_reference(run(fused, torch.bfloat16), expected, run(tv, torch.bfloat16), mean_error=True)


def _device_count():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.skipif(_device_count() < 2, reason=f"needs two CUDA devices, this machine has {_device_count()}")
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_non_default_device(backend, monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current, with tuning on (its timing
    runs must happen on cuda:1 too): the op and FusedResNeXtBlock give the
    right result on cuda:1 and leave the current device alone."""
    monkeypatch.setenv(settings.AUTOTUNE_ENV, "1")
    torch.cuda.set_device(0)
    block = Block(2, 64, 128, 256, 32, 14, 14, projection=True)
    inputs = block.make(torch.bfloat16, "cuda:1")
    for _ in range(2):  # the first call tunes, the second uses the choice
        y = ops.bottleneck_inference(*inputs, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                     backend=backend)
        assert y.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
        assert_op_matches_reference(y, inputs, block.conv, mean_error=True)

    tv = _projection_bottleneck()
    fused = rk.FusedResNeXtBlock.from_bottleneck(tv, backend=backend).to("cuda:1", torch.bfloat16)
    x = torch.randn(2, 64, 15, 15)
    with torch.no_grad():
        y = fused(x.to("cuda:1", torch.bfloat16).contiguous(memory_format=CL))
        eager = copy.deepcopy(tv).to("cuda:1", torch.bfloat16)(x.to("cuda:1", torch.bfloat16))
        expected = copy.deepcopy(tv).double()(x.double())
    assert y.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    assert_close_to_reference(y.cpu(), expected, eager.cpu(), mean_error=True)
