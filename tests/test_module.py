"""FusedResNeXtBlock as a drop-in for torchvision's and timm's Bottleneck (CPU, reference backend)."""

import copy
import warnings

import pytest
import torch
import torchvision
from helpers import randomize_norms
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import resnext_kernels as rk
from resnext_kernels import FusedResNeXtBlock

F64 = torch.float64


def _pair(inplanes, planes, stride=1, groups=1, base_width=64, dilation=1, norm_layer=None, dtype=F64):
    """A torchvision Bottleneck and a FusedResNeXtBlock with identical weights."""
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        norm = norm_layer or nn.BatchNorm2d
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), norm(planes * 4))
    tv = Bottleneck(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
    randomize_norms(tv)
    fused = FusedResNeXtBlock(inplanes, planes, stride, copy.deepcopy(downsample), groups, base_width, dilation,
                              norm_layer, backend="reference")
    fused.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(dtype), fused.to(dtype)


def _assert_same_step(tv, fused, x, tol=1e-10):
    """Forward + backward through both; compare output, every gradient, every buffer."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = tv(x1), fused(x2)
    torch.testing.assert_close(y2, y1, rtol=tol, atol=tol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=tol, atol=tol)
    p1, p2 = dict(tv.named_parameters()), dict(fused.named_parameters())
    assert p1.keys() == p2.keys()
    for name in p1:
        assert (p1[name].grad is None) == (p2[name].grad is None), name
        if p1[name].grad is not None:
            torch.testing.assert_close(p2[name].grad, p1[name].grad, rtol=tol, atol=tol, msg=name)
    b1, b2 = dict(tv.named_buffers()), dict(fused.named_buffers())
    assert b1.keys() == b2.keys()
    for name in b1:
        torch.testing.assert_close(b2[name], b1[name], rtol=tol, atol=tol, msg=name)


BLOCKS = [
    # inplanes, planes, stride, groups, base_width, dilation
    (16, 4, 1, 4, 16, 1),    # identity shortcut, d = 1
    (8, 4, 1, 2, 32, 1),     # projection (Cin != Cout), d = 2
    (16, 8, 2, 4, 32, 1),    # stride 2 projection, d = 4
    (32, 8, 1, 1, 64, 2),    # dilation 2, groups 1 (ResNet-50 style)
    (20, 6, 2, 3, 48, 1),    # odd counts: width 12, d = 4, Cout 24
]


@pytest.mark.parametrize("cfg", BLOCKS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_matches_torchvision(cfg, training):
    tv, fused = _pair(*cfg)
    tv.train(training)
    fused.train(training)
    x = torch.randn(2, cfg[0], 9, 7, dtype=F64)
    _assert_same_step(tv, fused, x)
    # A second step checks that running stats and the fold cache stay right.
    _assert_same_step(tv, fused, torch.randn_like(x))


def test_block_matches_torchvision_float32_channels_last():
    tv, fused = _pair(16, 8, 2, 4, 32, dtype=torch.float32)
    tv.eval()
    fused.eval()
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y1, y2 = tv(x), fused(x)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-4)
    assert y2.is_contiguous(memory_format=torch.channels_last)


def test_frozen_batchnorm_folds_in_train_mode():
    tv, fused = _pair(16, 4, 2, 2, 64, norm_layer=FrozenBatchNorm2d)
    assert isinstance(fused.bn1, FrozenBatchNorm2d)
    tv.train()
    fused.train()
    assert not fused.uses_batch_statistics()  # frozen stats: the fused op runs even in train mode
    _assert_same_step(tv, fused, torch.randn(2, 16, 7, 7, dtype=F64))


def test_from_bottleneck_copies():
    tv, _ = _pair(16, 8, 2, 4, 32)
    fused = FusedResNeXtBlock.from_bottleneck(tv, backend="reference")
    for (n1, t1), (n2, t2) in zip(tv.state_dict().items(), fused.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
        assert t1.data_ptr() != t2.data_ptr()  # a copy, not shared storage
    assert fused.backend == "reference" and fused.stride == 2


def _randomized_resnet(block_cls):
    torch.manual_seed(torch.initial_seed())
    model = ResNet(block_cls, [1, 2, 1, 1], groups=4, width_per_group=4, num_classes=10)
    return randomize_norms(model)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_resnet_built_both_ways(training):
    tv = _randomized_resnet(Bottleneck).to(F64)
    fused = ResNet(FusedResNeXtBlock, [1, 2, 1, 1], groups=4, width_per_group=4, num_classes=10).to(F64)
    fused.load_state_dict(tv.state_dict(), strict=True)
    assert sum(isinstance(m, FusedResNeXtBlock) for m in fused.modules()) == 5
    tv.train(training)
    fused.train(training)
    _assert_same_step(tv, fused, torch.randn(2, 3, 40, 40, dtype=F64), tol=1e-9)


def test_torchvision_resnext50_state_dict_loads_strict():
    tv = torchvision.models.resnext50_32x4d()
    fused = ResNet(FusedResNeXtBlock, [3, 4, 6, 3], groups=32, width_per_group=4)
    fused.load_state_dict(tv.state_dict(), strict=True)
    assert fused.state_dict().keys() == tv.state_dict().keys()


def test_convert_torchvision_model():
    tv = randomize_norms(torchvision.models.resnext50_32x4d(num_classes=10)).to(F64)
    fused = rk.convert(copy.deepcopy(tv), backend="reference")
    assert not any(isinstance(m, Bottleneck) for m in fused.modules())
    assert sum(isinstance(m, FusedResNeXtBlock) for m in fused.modules()) == 16
    assert fused.resnext_kernels_skipped == {}
    for training in (True, False):
        tv.train(training)
        fused.train(training)
        _assert_same_step(tv, fused, torch.randn(2, 3, 48, 48, dtype=F64), tol=1e-8)


def test_state_dict_round_trip():
    _, fused = _pair(16, 8, 2, 4, 32)
    fused.eval()
    x = torch.randn(2, 16, 7, 7, dtype=F64)
    y = fused(x)
    other = FusedResNeXtBlock(16, 8, 2, copy.deepcopy(fused.downsample), 4, 32, backend="reference").to(F64)
    other.load_state_dict(fused.state_dict(), strict=True)
    other.eval()
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)


def test_fold_cache_invalidated_on_parameter_change():
    _, fused = _pair(16, 4, 1, 4, 16)
    fused.eval()
    x = torch.randn(2, 16, 5, 5, dtype=F64)
    with torch.no_grad():
        y0 = fused(x)
        assert fused._fold_cache is not None
        fused.bn2.running_var.mul_(3.0)  # in-place: bumps _version
        y1 = fused(x)
        fused.conv3.weight.add_(0.1)
        y2 = fused(x)
    tv = Bottleneck(16, 4, 1, None, 4, 16).to(F64)
    tv.load_state_dict(fused.state_dict())
    tv.eval()
    with torch.no_grad():
        torch.testing.assert_close(y2, tv(x))
    assert not torch.allclose(y0, y1) and not torch.allclose(y1, y2)


def test_fold_cache_under_inference_mode():
    """Folded weights made under inference_mode are normal tensors, cached and reused."""
    _, fused = _pair(16, 4, 1, 4, 16)
    fused.eval()
    x = torch.randn(2, 16, 5, 5, dtype=F64)
    with torch.inference_mode():
        y1 = fused(x)
        first = fused._fold_cache[2]
        y2 = fused(x)
    assert fused._fold_cache[2] is first
    assert not any(t.is_inference() for t in first if t is not None)  # backends can key caches on _version
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="backend"):
        FusedResNeXtBlock(16, 4, backend="tpu")
    with pytest.raises(TypeError, match="groups"):
        FusedResNeXtBlock(16, 4, groups=2.0)
    with pytest.raises(ValueError, match="downsample"):
        FusedResNeXtBlock(16, 8, stride=2)  # needs a downsample
    with pytest.raises(ValueError, match="downsample"):
        FusedResNeXtBlock(16, 8, downsample=nn.Conv2d(16, 32, 1))
    with pytest.raises(ValueError, match="norm"):
        FusedResNeXtBlock(16, 4, norm_layer=nn.LayerNorm)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_input_errors(training):
    _, fused = _pair(16, 4, 1, 4, 16)
    fused.train(training)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fused(torch.randn(16, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="channels|Cin"):
        fused(torch.randn(1, 12, 5, 5, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randint(0, 5, (1, 16, 5, 5)))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fused([[1.0]])


def test_timm_resnext_convert_matches():
    timm = pytest.importorskip("timm")
    ref = randomize_norms(timm.create_model("resnext50_32x4d", num_classes=10)).to(F64)
    fused = rk.convert(copy.deepcopy(ref), backend="reference")
    assert sum(isinstance(m, FusedResNeXtBlock) for m in fused.modules()) == 16
    assert not [m for m in fused.modules() if type(m).__name__ == "Bottleneck"]
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        _assert_same_step(ref, fused, torch.randn(2, 3, 48, 48, dtype=F64), tol=1e-8)


def test_timm_blocks_with_extras_are_left_alone_and_reported():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnext26d_32x4d", num_classes=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rk.convert(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, rk.ConversionWarning)]
    assert len(messages) == 1 and "attention" in messages[0]
    assert len(model.resnext_kernels_skipped) == 8
    assert not any(isinstance(m, FusedResNeXtBlock) for m in model.modules())

    # drop-path and anti-aliasing are reported too
    block = timm.models.resnet.Bottleneck(64, 16, drop_path=nn.Dropout(0.1))
    assert "drop-path" in rk.block.unsupported_reason(block)
    block = timm.models.resnet.Bottleneck(64, 16, stride=2, aa_layer=nn.AvgPool2d,
                                          downsample=nn.Sequential(nn.Conv2d(64, 64, 1, 2, bias=False),
                                                                   nn.BatchNorm2d(64)))
    assert "anti-aliasing" in rk.block.unsupported_reason(block)
