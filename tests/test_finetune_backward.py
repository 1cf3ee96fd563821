"""Fine-tuning with frozen BatchNorm (issue 22): the inference op's fused
backward on triton (backends/triton/inference_backward.py), against fp64
torchvision eager, under the interpreter on CPU.

Configs are drawn at random per run (the test's seed) from the issue's
space: C in {1, 2, 4, 8, 32}, d in {4, 8, 16, 64}, stride 1/2, dilation 1/2,
projection or identity, FrozenBatchNorm2d or eval-mode BatchNorm2d, some
parameters (and sometimes x) frozen. Sizes stay small for the interpreter
(H, W <= 9; width <= 64, 128 for 32x4).

ReLU kinks. A pre-activation that rounds across 0 flips a ReLU mask and
changes a gradient by O(1), in eager or in the fused path, at different
elements, so "2x eager's error" would be a coin toss there
(tests/training_cases.py, KINK_MARGIN). fp32 cases redraw x until no
pre-activation lies within KINK_MARGIN of 0; fp16's rounding (~1e-3) is too
coarse for that, so fp16 cases shift each BN's bias per channel so that the
channel's pre-activations all lie at least POLAR_MARGIN above or below 0
(random on/off channels: the masks are per-channel there, the element-wise
masks are the fp32 cases').
"""

import copy
import random

import pytest
import torch
from helpers import assert_close_to_reference, randomize_norms
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d
from training_cases import DEVICE, KINK_MARGIN, OpRecorder, cuda_only, forbidden_ops, needs_triton

from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.backends import registry
from resnext_kernels.backends.triton import inference_backward as triton_backward
from resnext_kernels.common import tolerance
from resnext_kernels.ops import inference_backward as backward_op

F64 = torch.float64
POLAR_MARGIN = 0.25  # fp16 cases: |pre-activation| >= this (BN outputs of scale ~1)
FLOOR_ULPS = {torch.float16: 1, torch.float32: 0}  # as tests/training_cases.py: one ulp for 16-bit results

pytestmark = needs_triton


def random_config():
    """(inplanes, planes, groups, base_width, stride, dilation, norm, h, w) from the issue's space."""
    groups = random.choice([1, 2, 4, 8, 32])
    d = random.choice([d for d in (4, 8, 16, 64) if groups * d <= (128 if groups == 32 else 64)])
    planes = random.choice([p for p in (4, 8, 16) if (d * 64) % p == 0])
    stride = random.choice([1, 2])
    identity = stride == 1 and random.random() < 0.5
    inplanes = 4 * planes if identity else random.choice([8, 16, 24])
    sizes = [5] if groups == 32 else [5, 7, 9]  # 32 x 4 is 128 channels wide: the smallest images
    return dict(inplanes=inplanes, planes=planes, groups=groups, base_width=d * 64 // planes, stride=stride,
                dilation=random.choice([1, 2]), norm=random.choice(["frozen", "eval"]),
                h=random.choice(sizes), w=random.choice(sizes))


def torchvision_block(cfg):
    """The fp64 reference block, eval mode, random BN parameters and statistics."""
    norm = FrozenBatchNorm2d if cfg["norm"] == "frozen" else nn.BatchNorm2d
    cout = 4 * cfg["planes"]
    downsample = None
    if cfg["stride"] != 1 or cfg["inplanes"] != cout:
        downsample = nn.Sequential(nn.Conv2d(cfg["inplanes"], cout, 1, stride=cfg["stride"], bias=False), norm(cout))
    block = Bottleneck(cfg["inplanes"], cfg["planes"], cfg["stride"], downsample, cfg["groups"], cfg["base_width"],
                       cfg["dilation"], norm)
    return randomize_norms(block).to(F64).eval()


def pre_activations(block, x):
    """The inputs of the block's three ReLUs (eval mode)."""
    with torch.no_grad():
        p1 = block.bn1(block.conv1(x))
        p2 = block.bn2(block.conv2(p1.relu()))
        shortcut = x if block.downsample is None else block.downsample(x)
        return p1, p2, block.bn3(block.conv3(p2.relu())) + shortcut


def polarize(block, x):
    """Shift bn1, bn2, bn3's biases per channel so that each channel's
    pre-activations on x lie all >= POLAR_MARGIN or all <= -POLAR_MARGIN
    (on with probability 0.6)."""
    for i, bn in enumerate((block.bn1, block.bn2, block.bn3)):
        pre = pre_activations(block, x)[i].transpose(0, 1).flatten(1)  # [C, values]
        on = torch.rand(pre.shape[0], dtype=F64) < 0.6
        shift = torch.where(on, POLAR_MARGIN - pre.min(1).values, -POLAR_MARGIN - pre.max(1).values)
        with torch.no_grad():
            bn.bias += shift


def draw_input(cfg, block, tries=100):
    """An N(0, 1) input none of whose pre-activations lies within KINK_MARGIN of 0."""
    for _ in range(tries):
        x = torch.randn(2, cfg["inplanes"], cfg["h"], cfg["w"], dtype=F64)
        if all(p.abs().min() > KINK_MARGIN for p in pre_activations(block, x)):
            return x
    raise AssertionError(f"{tries} inputs in a row had a pre-activation within {KINK_MARGIN} of 0")


def freeze_some(models):
    """Freeze the same random subset of parameters (at least one left
    trainable) in every model; returns the frozen names."""
    names = [n for n, _ in models[0].named_parameters()]
    frozen = {n for n in names if random.random() < 0.35}
    if frozen == set(names):
        frozen.discard(random.choice(names))
    for m in models:
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
    return frozen


def step(model, x, grad, dtype, x_grad):
    """(y, x.grad, {name: grad}) of one forward + backward on DEVICE, channels_last."""
    xi = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last).detach().requires_grad_(x_grad)
    y = model(xi)
    y.backward(grad.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last))
    return y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}


def close(what, actual, expected, eager, cfg):
    floor = max(tolerance.FLOOR, FLOOR_ULPS[actual.dtype] * torch.finfo(actual.dtype).eps)
    try:
        assert_close_to_reference(actual.cpu(), expected, eager.cpu(), floor=floor)
    except AssertionError as exc:
        raise AssertionError(f"{what} ({cfg}): {exc}") from None


def check_against_fp64(cfg, ref, x, dtype, backend="triton", freeze=True):
    """One forward + backward of `ref` (fp64), its eager copy at dtype and
    the fused block on `backend` at dtype (a random subset of parameters,
    and sometimes x, frozen when `freeze`), compared with the tolerance
    rule; returns the ops the fused step dispatched."""
    eager = copy.deepcopy(ref).to(DEVICE, dtype)
    fused = FusedResNeXtBlock.from_bottleneck(ref, backend=backend).to(DEVICE, dtype).eval()
    frozen = freeze_some([ref, eager, fused]) if freeze else set()
    x_grad = random.random() < 0.75 if freeze else True
    cfg = dict(cfg, frozen=sorted(frozen), x_grad=x_grad, backend=backend)
    ho, wo = (cfg["h"] - 1) // cfg["stride"] + 1, (cfg["w"] - 1) // cfg["stride"] + 1
    grad = torch.randn(2, 4 * cfg["planes"], ho, wo, dtype=F64)

    expect = step(ref, x, grad, F64, x_grad)
    base = step(eager, x, grad, dtype, x_grad)
    with OpRecorder() as ops:
        got = step(fused, x, grad, dtype, x_grad)
    close("y", got[0], expect[0], base[0], cfg)
    assert (got[1] is None) == (not x_grad)
    if x_grad:
        close("x.grad", got[1], expect[1], base[1], cfg)
    assert got[2].keys() == expect[2].keys()
    for name, g in expect[2].items():
        assert (got[2][name] is None) == (g is None) == (name in frozen), name
        if g is not None:
            close(f"{name}.grad", got[2][name], g, base[2][name], cfg)
    return ops.seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("draw", range(2))
def test_random_configs_match_fp64_torchvision(dtype, draw):
    cfg = random_config()
    ref = torchvision_block(cfg)
    if dtype == torch.float32:
        x = draw_input(cfg, ref)
    else:
        x = torch.randn(2, cfg["inplanes"], cfg["h"], cfg["w"], dtype=F64)
        polarize(ref, x)
    check_against_fp64(cfg, ref, x, dtype)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=cuda_only) for b in ("cuda", "auto")])
def test_gpu_cuda_and_auto_forwards_run_the_fused_backward(backend):
    """On a GPU the cuda backend's forward (and auto's choice) is followed
    by the fused backward, with eager's accuracy (fp32, TF32 as cuDNN's)."""
    reason = registry.unavailable_reason("cuda", DEVICE) if backend == "cuda" else None
    if reason is not None:
        pytest.skip(f"backend 'cuda' unusable: {reason}")
    cfg = random_config()
    ref = torchvision_block(cfg)
    seen = check_against_fp64(cfg, ref, draw_input(cfg, ref), torch.float32, backend, freeze=False)
    assert "resnext_kernels.bottleneck_inference_backward" in seen
    assert not forbidden_ops(seen)


def _block(cfg, dtype=torch.float32):
    ref = torchvision_block(cfg)
    return ref, FusedResNeXtBlock.from_bottleneck(ref, backend="triton").to(DEVICE, dtype).eval()


PROJECTION_CFG = dict(inplanes=16, planes=8, groups=4, base_width=32, stride=2, dilation=2, norm="eval", h=7, w=5)


def test_no_aten_convolution_or_batch_norm_forward_or_backward():
    """Forward and backward of an eval-mode block on triton run the
    inference op and its backward op and no ATen conv or batch norm: at the
    block level (the fold, the autograd glue) and inside the triton
    backend's forward and backward functions. The ATen backward the
    reference uses records convolutions, so the check can fail."""
    ref, fused = _block(PROJECTION_CFG)
    x = torch.randn(2, 16, 7, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with OpRecorder() as block_level:
        y = fused(x)
        y.backward(torch.randn_like(y))
    assert {"resnext_kernels.bottleneck_inference", "resnext_kernels.bottleneck_inference_backward"} \
        <= block_level.seen
    assert not forbidden_ops(block_level.seen)

    w1, b1, w2, b2, w3, b3, wd, bd = _op_inputs(fused, x)
    conv = (2, 2, 4)
    with OpRecorder() as inside:
        y = registry.kernel("triton")(x.detach(), w1, b1, w2, b2, w3, b3, wd, bd, *conv)
        grads = triton_backward.bottleneck_inference_backward_triton(
            torch.randn_like(y), x.detach(), w1, b1, w2, b2, w3, b3, wd, bd, y, *conv, [True] * 8)
    assert all(g is not None for g in grads)
    assert not forbidden_ops(inside.seen), forbidden_ops(inside.seen)

    reference = FusedResNeXtBlock.from_bottleneck(ref, backend="reference").float().eval()
    with OpRecorder() as aten:
        y = reference(x.cpu())
        y.backward(torch.randn_like(y))
    assert "aten.convolution_backward" in aten.seen


def _op_inputs(block, x):
    """The folded weights and biases the block passes to the inference op."""
    captured = {}

    class Capture(OpRecorder):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) == "resnext_kernels.bottleneck_inference":
                captured["args"] = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:9]]
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Capture():
        block(x.detach())
    return captured["args"]


def test_frozen_parameters_get_no_gradient_and_their_kernels_do_not_run(monkeypatch):
    """conv1, bn1's weight, conv2 and bn2 frozen, x without gradient (a
    first trainable block): only conv3's wgrad and dgrad and the grouped
    dgrad (bn1.bias still trains) run; the gradients match fp64 eager."""
    from resnext_kernels.backends.triton.packing import GroupTiling

    assert GroupTiling(4, 1).has_padding
    calls = []
    for name in ("conv1x1_wgrad", "conv1x1_dgrad", "grouped_conv_wgrad", "grouped_conv_dgrad"):
        original = getattr(triton_backward, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, tuple(args[4].shape) if _name == "conv1x1_dgrad" else None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_backward, name, counted)
    # One group of 4 channels: packed t1/t2 hold padding, so the gather to
    # real channels (inference_backward._real_channels) runs and is checked.
    cfg = dict(PROJECTION_CFG, stride=1, dilation=1, groups=1)
    ref, fused = _block(cfg)
    frozen = {"conv1.weight", "bn1.weight", "conv2.weight", "bn2.weight", "bn2.bias"}
    for m in (ref, fused):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in frozen)
    x = draw_input(cfg, ref)
    grad = torch.randn(2, 32, 7, 5, dtype=F64)
    expect = step(ref, x, grad, F64, False)
    eager = step(copy.deepcopy(ref).float(), x, grad, torch.float32, False)
    got = step(fused, x, grad, torch.float32, False)
    assert sorted(c[0] for c in calls) == ["conv1x1_dgrad", "conv1x1_wgrad", "conv1x1_wgrad", "grouped_conv_dgrad"]
    assert ("conv1x1_dgrad", tuple(fused.conv3.weight.shape)) in calls  # conv3's dgrad, not conv1's
    for name, g in expect[2].items():
        assert (got[2][name] is None) == (name in frozen), name
        if g is not None:
            close(f"{name}.grad", got[2][name], g, eager[2][name], cfg)


def test_backward_op_opcheck():
    """torch.library.opcheck of the backward op (schema, fake kernel), on a small block."""
    cfg = dict(inplanes=8, planes=4, groups=2, base_width=64, stride=2, dilation=1, norm="frozen", h=5, w=5)
    _, fused = _block(cfg)
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w1, b1, w2, b2, w3, b3, wd, bd = _op_inputs(fused, x)
    y = registry.kernel("triton")(x, w1, b1, w2, b2, w3, b3, wd, bd, 2, 1, 2)
    needs = [True, False, True, True, False, True, True, True]
    args = (torch.randn_like(y), x, w1, b1, w2, b2, w3, b3, wd, bd, y, 2, 1, 2, needs, "triton")
    torch.library.opcheck(backward_op._inference_backward_op, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_backward_backend_by_forward_backend_and_device():
    """triton's and cuda's forwards get the fused backward where triton can
    run; the reference, cuda_emulated and auto on CPU keep the ATen one."""
    assert registry.inference_backward_backend("triton", DEVICE) == "triton"
    assert registry.inference_backward_backend("reference", DEVICE) == "reference"
    if DEVICE == "cpu":
        assert registry.inference_backward_backend("auto", "cpu") == "reference"
        assert registry.inference_backward_backend("cuda_emulated", "cpu") == "reference"
    else:
        assert registry.inference_backward_backend("auto", "cuda") == "triton"
        assert registry.inference_backward_backend("cuda", "cuda") == "triton"


def test_compiled_backward_traces_the_backward_op():
    """torch.compile (aot_eager, fullgraph) of a FrozenBatchNorm2d block on
    triton: AOTAutograd traces the backward op's fake kernel, and the
    compiled step's gradients are the uncompiled block's (same kernels)."""
    torch._dynamo.reset()
    cfg = dict(inplanes=16, planes=4, groups=2, base_width=64, stride=1, dilation=1, norm="frozen", h=5, w=5)
    _, fused = _block(cfg)
    twin = copy.deepcopy(fused)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 5, 5, device=DEVICE)
    grads = []
    for model in (fused, compiled):
        xi = x.clone().requires_grad_(True)
        model(xi).backward(grad)
        grads.append([xi.grad] + [p.grad for p in (fused if model is fused else twin).parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)
