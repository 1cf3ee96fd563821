"""torch.compile(fullgraph=True) of a converted model matches eager."""

import copy

import pytest
import torch
from helpers import randomize_norms
from torchvision.models.resnet import Bottleneck, ResNet

import resnext_kernels as rk


def _small_converted_resnext():
    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)
    return rk.convert(randomize_norms(model), backend="reference").eval()


def test_compile_fullgraph_inference_matches_eager():
    torch._dynamo.reset()
    model = _small_converted_resnext()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expect = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
        # A parameter change after compiling must reach the compiled model too.
        model.layer1[0].bn2.running_var.mul_(2.0)
        expect2 = model(x)
        got2 = compiled(x)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got2, expect2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expect, expect2)


@pytest.mark.parametrize("norm", ["eval", "train"])
def test_compile_fullgraph_backward_matches_eager(norm):
    """Autograd through the op (eval BN) and through the ATen train path, compiled."""
    torch._dynamo.reset()
    model = _small_converted_resnext().train(norm == "train")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    y1, y2 = model(x), compiled(x)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-4)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (name, p1), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_compile_auto_float64_on_cpu():
    """backend="auto" reaches the op unresolved (it chooses at run time); its
    fake kernel must check it as the backend it resolves to: the reference,
    which takes float64 on CPU."""
    from helpers import Block

    from resnext_kernels.backends.reference import bottleneck_inference_reference

    block = Block(1, 8, 16, 8, 2, 4, 5)
    args = block.make(torch.float64)
    compiled = torch.compile(lambda *t: rk.bottleneck_inference(*t, stride=1, dilation=1, groups=2), fullgraph=True)
    torch.testing.assert_close(compiled(*args), bottleneck_inference_reference(*args, *block.conv))
