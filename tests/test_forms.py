"""The paper's three forms (a) branches, (b) early concat, (c) grouped conv are equivalent.

float64, train and eval mode: same output, same gradients (mapped through the
exact converters), same running-stat updates.
"""

import pytest
import torch
from helpers import randomize_norms
from torch import nn

from resnext_kernels import FusedResNeXtBlock, forms

CASES = [
    # inplanes, planes, stride, groups, base_width, dilation, projection
    (16, 4, 1, 4, 16, 1, False),  # identity shortcut, d = 1
    (12, 4, 2, 2, 32, 1, True),   # stride 2, projection, d = 2
    (16, 8, 1, 4, 16, 2, True),   # dilation 2, d = 2, Cin != Cout
]


def _grouped_block(inplanes, planes, stride, groups, base_width, dilation, projection):
    downsample = None
    if projection:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    block = FusedResNeXtBlock(inplanes, planes, stride, downsample, groups, base_width, dilation,
                              backend="reference")
    return randomize_norms(block).double()


def _grouped_grads(block):
    return {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("make_form", [forms.grouped_to_branches, forms.grouped_to_concat], ids=["a", "b"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forms_equivalent(case, make_form, training):
    block_c = _grouped_block(*case).train(training)
    block_x = make_form(block_c).train(training)
    x = torch.randn(3, case[0], 7, 9, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)

    y_c = block_c(x)
    y_x = block_x(x2)
    torch.testing.assert_close(y_x, y_c, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(y_c)
    y_c.backward(grad_out)
    y_x.backward(grad_out)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-11, atol=1e-11)

    # Map form (a)/(b) back to (c): parameters, their gradients and running stats.
    back = forms.multipath_to_grouped(block_x)
    for name, buf in block_c.named_buffers():
        torch.testing.assert_close(dict(back.named_buffers())[name], buf, rtol=1e-12, atol=1e-12)
    grads_x = _grads_mapped_to_grouped(block_x)
    for name, grad in _grouped_grads(block_c).items():
        torch.testing.assert_close(grads_x[name], grad, rtol=1e-10, atol=1e-11, msg=name)


def _grads_mapped_to_grouped(block):
    """Gradients of a form (a)/(b) block laid out like form (c)'s parameters."""
    br = block.branches
    grads = {
        "conv1.weight": torch.cat([b.conv1.weight.grad for b in br]),
        "bn1.weight": torch.cat([b.bn1.weight.grad for b in br]),
        "bn1.bias": torch.cat([b.bn1.bias.grad for b in br]),
        "conv2.weight": torch.cat([b.conv2.weight.grad for b in br]),
        "bn2.weight": torch.cat([b.bn2.weight.grad for b in br]),
        "bn2.bias": torch.cat([b.bn2.bias.grad for b in br]),
        "bn3.weight": block.bn3.weight.grad,
        "bn3.bias": block.bn3.bias.grad,
    }
    if isinstance(block, forms.BranchBlock):
        grads["conv3.weight"] = torch.cat([b.conv3.weight.grad for b in br], dim=1)
    else:
        grads["conv3.weight"] = block.conv3.weight.grad
    if block.downsample is not None:
        for name, p in block.downsample.named_parameters():
            grads[f"downsample.{name}"] = p.grad
    return grads


@pytest.mark.parametrize("make_form", [forms.grouped_to_branches, forms.grouped_to_concat], ids=["a", "b"])
def test_round_trip_is_exact(make_form):
    block_c = _grouped_block(*CASES[1])
    back = forms.multipath_to_grouped(make_form(block_c))
    sd_c, sd_back = block_c.state_dict(), back.state_dict()
    assert sd_c.keys() == sd_back.keys()
    for key in sd_c:
        assert torch.equal(sd_c[key], sd_back[key]), key


def test_branch_count_is_cardinality():
    block_c = _grouped_block(*CASES[0])
    assert forms.grouped_to_branches(block_c).cardinality == block_c.conv2.groups
    with pytest.raises(TypeError, match="block"):
        forms.multipath_to_grouped(block_c)
