"""Model builders (resnext_kernels.models) and unconvert: parameter counts,
output shapes, torchvision weights and state_dicts in and out."""

import pytest
import torch
import torchvision
from helpers import randomize_norms
from torchvision.models import resnet as tv_resnet

import resnext_kernels as rk
from resnext_kernels import FusedResNeXtBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("builder,paper_millions", [(rk.models.resnext29_8x64d, 34.4),
                                                     (rk.models.resnext29_16x64d, 68.1)])
def test_cifar_models_have_the_papers_parameter_counts(builder, paper_millions):
    model = builder(backend="reference").eval()
    assert abs(n_params(model) / 1e6 - paper_millions) <= 0.1, n_params(model)
    blocks = [m for m in model.modules() if isinstance(m, FusedResNeXtBlock)]
    assert len(blocks) == 9  # three stages of three blocks
    # widths C x d per stage (d doubles per stage) and stage outputs 256, 512, 1024
    card = blocks[0].conv2.groups
    assert [b.conv2.out_channels for b in blocks[::3]] == [card * 64, card * 128, card * 256]
    assert [b.conv3.out_channels for b in blocks[::3]] == [256, 512, 1024]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cifar_variant():
    model = rk.models.resnext29(2, 4, num_classes=7, blocks_per_stage=1, in_channels=1, backend="reference").eval()
    assert sum(isinstance(m, FusedResNeXtBlock) for m in model.modules()) == 3
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)
    with pytest.raises(ValueError, match="cardinality"):
        rk.models.resnext29(0, 4)
    with pytest.raises(TypeError, match="width_per_group"):
        rk.models.resnext29(2, 4.0)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"])
def test_imagenet_builders_match_torchvision(name):
    """Same parameters and state_dict keys as torchvision's model, every
    block fused, output [N, 1000]. (Outputs equal torchvision's: the
    round-trip test below, on resnext50_32x4d.)"""
    tv_model = getattr(torchvision.models, name)()
    fused = getattr(rk.models, name)(backend="reference").eval()
    assert n_params(fused) == n_params(tv_model)
    assert fused.state_dict().keys() == tv_model.state_dict().keys()
    assert not any(isinstance(m, tv_resnet.Bottleneck) for m in fused.modules())
    assert sum(isinstance(m, FusedResNeXtBlock) for m in fused.modules()) == sum(fused_layer_blocks(fused))
    with torch.no_grad():
        assert fused(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def fused_layer_blocks(model):
    return [len(getattr(model, f"layer{i}")) for i in range(1, 5)]


def test_weights_enum_loads_strictly_as_torchvision_does(monkeypatch):
    """weights= goes through torchvision's own builder (its verify, its
    num_classes override and its download); the download is stood in for."""
    torch.manual_seed(1)
    source = randomize_norms(torchvision.models.resnext50_32x4d()).eval()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return source.state_dict()

    monkeypatch.setattr(tv_resnet.ResNeXt50_32X4D_Weights, "get_state_dict", get_state_dict)
    weights = tv_resnet.ResNeXt50_32X4D_Weights.IMAGENET1K_V2
    fused = rk.models.resnext50_32x4d(weights=weights, backend="reference").eval()
    assert calls == [weights]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), source(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="ResNeXt50_32X4D_Weights"):  # another model's weights: torchvision refuses
        rk.models.resnext50_32x4d(weights=tv_resnet.ResNet50_Weights.IMAGENET1K_V2)


def test_torchvision_state_dict_round_trip():
    """fused model <- torchvision state_dict (strict) -> unconvert -> plain
    torchvision modules with the same outputs and the same state_dict."""
    torch.manual_seed(2)
    tv = randomize_norms(torchvision.models.resnext50_32x4d()).eval()
    fused = rk.models.resnext50_32x4d(backend="reference").eval()
    fused.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_fused = fused(x)
    plain = rk.unconvert(fused)
    assert plain is fused
    assert not any(isinstance(m, FusedResNeXtBlock) for m in plain.modules())
    assert sum(type(m) is tv_resnet.Bottleneck for m in plain.modules()) == 16
    assert plain.state_dict().keys() == tv.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y_fused, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(plain(x), tv(x), rtol=1e-4, atol=1e-4)
    # and the unconverted checkpoint loads into a plain torchvision model
    again = torchvision.models.resnext50_32x4d().eval()
    again.load_state_dict(plain.state_dict(), strict=True)


def test_cifar_model_unconverts_to_torchvision_bottlenecks():
    model = randomize_norms(rk.models.resnext29(2, 4, blocks_per_stage=2, backend="reference")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        rk.unconvert(model)
        assert sum(type(m) is tv_resnet.Bottleneck for m in model.modules()) == 6
        assert isinstance(model, tv_resnet.ResNet)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    # the same model built from torchvision's Bottleneck directly takes the checkpoint
    plain = rk.models.ResNeXt29(2, 4, blocks_per_stage=2, block=tv_resnet.Bottleneck).eval()
    plain.load_state_dict(model.state_dict(), strict=True)


def test_unconvert_keeps_mode_and_refuses_a_block():
    block = FusedResNeXtBlock(64, 16, groups=4, base_width=16, backend="reference").train()
    with pytest.raises(ValueError, match="to_bottleneck"):
        rk.unconvert(block)
    plain = block.to_bottleneck()
    assert type(plain) is tv_resnet.Bottleneck and plain.training
    assert plain.state_dict().keys() == block.state_dict().keys()
