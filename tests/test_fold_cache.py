"""The fold cache of FusedResNeXtBlock (folded_parameters) never returns
weights folded from parameters the block no longer has.

Each scenario changes the block's parameters or buffers between two
forwards, on every backend usable on CPU, and compares each forward with
torchvision's own Bottleneck.forward run on the block's current submodules
(the unfused math). Stale folded weights differ by O(1); the tolerance is
that of a correct fp32 fused block (TF32 off).
"""

import copy
import pickle

import pytest
import torch
from helpers import randomize_norms
from torchvision.models.resnet import Bottleneck

import resnext_kernels as rk
from resnext_kernels.backends import registry

BACKENDS = [b for b in ("reference", "cuda_emulated", "triton") if registry.unavailable_reason(b, "cpu") is None]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param


def make_block(backend, projection=False):
    stride = 2 if projection else 1
    ds = None
    if projection:
        ds = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(64))
    tv = Bottleneck(32 if projection else 64, 16, stride, ds, groups=4, base_width=16)
    return rk.FusedResNeXtBlock.from_bottleneck(randomize_norms(tv).eval(), backend=backend).eval()


def unfused(block, x):
    """torchvision's forward on the block's current submodules."""
    return Bottleneck.forward(block, x)


def check(block, x):
    with torch.no_grad():
        y = block(x)
        torch.testing.assert_close(y, unfused(block, x), rtol=1e-4, atol=1e-4)
    return y


def x_for(block):
    return torch.randn(2, block.conv1.in_channels, 7, 7)


def test_parameter_replaced_at_the_freed_address(backend):
    """The issue's reproduction, repeated until the new parameter lands at
    the freed one's address (same shape, version 0) at least once."""
    block = make_block(backend)
    x = x_for(block)
    same_address = 0
    for _ in range(30):
        check(block, x)
        shape, old_ptr = block.conv1.weight.shape, block.conv1.weight.data_ptr()
        with torch.no_grad():
            block.conv1.weight = None
            # One allocation right after the free: the allocator tends to hand the freed block back.
            block.conv1.weight = torch.nn.Parameter(torch.randn(shape).mul_(0.2))
        same_address += block.conv1.weight.data_ptr() == old_ptr
        check(block, x)
        if same_address >= 3:
            break
    assert same_address >= 1, "the allocator never reused the address; the test did not exercise the hazard"


def test_parameter_replaced_while_the_old_one_is_alive(backend):
    block = make_block(backend)
    x = x_for(block)
    check(block, x)
    old = block.conv3.weight
    block.conv3.weight = torch.nn.Parameter(torch.randn_like(old) * 0.2)
    check(block, x)
    block.conv3.weight = old  # and back: the cache must not think nothing changed since the first call
    check(block, x)


def test_in_place_updates_under_no_grad(backend):
    block = make_block(backend)
    x = x_for(block)
    check(block, x)
    with torch.no_grad():
        block.conv2.weight.mul_(-1.5)
        block.bn2.running_mean.add_(0.3)
    check(block, x)


def test_data_assignment_swaps_the_storage(backend):
    block = make_block(backend)
    x = x_for(block)
    check(block, x)
    block.conv1.weight.data = torch.randn_like(block.conv1.weight) * 0.2  # same Parameter object
    check(block, x)


def test_load_state_dict(backend):
    block, other = make_block(backend), make_block(backend)
    x = x_for(block)
    check(block, x)
    block.load_state_dict(other.state_dict())
    y = check(block, x)
    with torch.no_grad():
        torch.testing.assert_close(y, unfused(other, x), rtol=1e-4, atol=1e-4)


def test_bn_buffer_replaced(backend):
    block = make_block(backend, projection=True)
    x = x_for(block)
    check(block, x)
    block.downsample[1].running_var = torch.rand_like(block.downsample[1].running_var) + 2.0
    check(block, x)


def test_to_dtype(backend):
    block = make_block(backend)
    x = x_for(block)
    check(block, x)
    dtype = torch.float64 if backend == "reference" else torch.float16
    block.to(dtype)
    with torch.no_grad():
        y = block(x.to(dtype))
        ref = unfused(block.double(), x.double())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_weight_norm_parametrization_updated_between_calls(backend):
    block = make_block(backend)
    torch.nn.utils.parametrizations.weight_norm(block.conv3)
    x = x_for(block)
    check(block, x)
    with torch.no_grad():
        block.conv3.parametrizations.weight.original0.mul_(2.0)  # the norm g
    check(block, x)
    with torch.no_grad():
        block.conv3.parametrizations.weight.original1.neg_()  # the direction v
    check(block, x)


def test_copies_fold_their_own_parameters():
    block = make_block("reference")
    x = x_for(block)
    check(block, x)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        with torch.no_grad():
            clone.conv1.weight.mul_(0.5)
        check(clone, x)
        check(block, x)


def test_steady_state_hits_the_cache(monkeypatch):
    block = make_block("reference")
    x = x_for(block)
    folds = []
    real = block._fold
    monkeypatch.setattr(block, "_fold", lambda dtype: folds.append(dtype) or real(dtype))
    with torch.no_grad():
        for _ in range(3):
            block(x)
    assert folds == [torch.float32]
