"""User-facing errors (issue 10): bad input names what the user passed (x and
the block's convs), the same in eval and train mode; convert() warns when it
converted nothing, saying why."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

import resnext_kernels as rk
from resnext_kernels import FusedResNeXtBlock

INTERNAL_NAMES = ("w1", "w2", "w3", "wd", "b1", "Cin=")


def _error(block, x):
    with pytest.raises((TypeError, ValueError)) as info:
        block(x)
    message = str(info.value)
    assert not any(name in message for name in INTERNAL_NAMES), message
    return info.type, message


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bad_input_is_reported_in_the_users_terms(training):
    block = FusedResNeXtBlock(256, 64, backend="reference").train(training)
    assert _error(block, torch.randn(1, 128, 5, 5)) == (ValueError, "x has 128 channels but conv1 expects 256")
    kind, message = _error(block, torch.randn(1, 256, 5, 5, device="meta"))
    assert kind is ValueError and message.startswith("x is on meta but the block's parameters")
    assert _error(block, torch.randn(256, 5, 5))[1].startswith("x must be 4-D")
    assert _error(block, torch.ones(1, 256, 5, 5, dtype=torch.int64))[0] is TypeError


def test_eval_and_train_say_the_same():
    block = FusedResNeXtBlock(64, 16, groups=4, base_width=32, backend="reference")
    x = torch.randn(2, 32, 5, 5)
    assert _error(block.eval(), x) == _error(block.train(), x)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_other_op_errors_pass_through(training):
    """Errors that are not about x against the block stay the op's own:
    H or W = 0 is rejected, as by eager's conv (an empty batch, N = 0, is
    not: tests/test_fidelity_empty.py)."""
    block = FusedResNeXtBlock(64, 16, backend="reference").train(training)
    for shape in ((2, 64, 0, 5), (2, 64, 5, 0)):
        with pytest.raises(ValueError, match=r"x must be non-empty in H and W, got shape \(2, 64"):
            block(torch.randn(shape))


def test_convert_warns_when_there_is_no_bottleneck():
    for model in (torchvision.models.resnet18(), nn.Linear(4, 4)):
        with pytest.warns(rk.ConversionWarning, match="converted nothing: .* contains no torchvision or timm"):
            rk.convert(model)
        assert model.resnext_kernels_skipped == {}


def test_convert_warns_when_every_candidate_was_skipped():
    model = nn.Sequential(torchvision.models.resnet.Bottleneck(64, 16))
    model[0].conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=True)  # a conv the block cannot fold
    with pytest.warns(rk.ConversionWarning, match=r"converted nothing: left 1 Bottleneck block\(s\)") as rec:
        rk.convert(model)
    assert "0: conv2 must be an nn.Conv2d 3x3 with bias=False" in str(rec[0].message)


def test_convert_is_silent_when_it_converted_everything():
    model = nn.Sequential(torchvision.models.resnet.Bottleneck(64, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.convert(model)
    assert isinstance(model[0], FusedResNeXtBlock)
