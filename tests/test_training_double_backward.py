"""Double backward through a block (issue 20): gradients of gradients, as
gradient penalties take them (R1, WGAN-GP, input-gradient regularisers:
``grad_x = autograd.grad(y, x, g, create_graph=True)``, then
``(grad_x ** 2).sum().backward()``), match float64 eager torchvision.

Train mode (batch-statistics BN; the training backends): while a graph is
recorded the training op differentiates the reference composite
(ops/training_double_backward.py), so second derivatives through the batch
statistics are eager's, nonzero for x too. Eval mode (folded BN, every
backend usable on CPU): the inference op's backward is made of ATen ops;
the penalty's gradient reaches the weights (ReLU is piecewise linear, so
its second derivative in x is 0, in eager too; the conv weights' is not).
Tolerance: training_cases.close, 3x eager fp32's error vs the fp64
reference; inputs are redrawn away from ReLU's kink (training_cases.draw_input).
"""

import copy

import pytest
import torch
from fidelity_cases import cpu_backend_modes
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from training_cases import F64, TrainCase, close, draw_input

from resnext_kernels import FusedResNeXtBlock

CASES = {"identity": TrainCase(16, 4, 2, 64, 5, 5), "projection": TrainCase(12, 4, 4, 32, 5, 5, stride=2)}


def penalty_step(block, x, g, dtype):
    """(grad_x, x.grad, {param: grad}) of the penalty (grad_x ** 2).sum()."""
    block.zero_grad(set_to_none=True)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = block(x)
    grad_x, = torch.autograd.grad(y, x, g.to(dtype), create_graph=True)
    (grad_x ** 2).sum().backward()
    return grad_x.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def check(case, backend, train, frozen_bn2=False):
    ref = case.torchvision_block().train(train)
    if frozen_bn2:
        ref.bn2.eval()  # normalizes with its running statistics inside a training block
    eager = copy.deepcopy(ref).float()
    fused = FusedResNeXtBlock.from_bottleneck(ref, backend=backend).float()
    x = draw_input(case, ref)
    ho, wo = (case.h - 1) // case.stride + 1, (case.w - 1) // case.stride + 1
    g = torch.randn(case.n, 4 * case.planes, ho, wo, dtype=F64)
    expect = penalty_step(ref, x, g, F64)
    base = penalty_step(eager, x, g, torch.float32)
    got = penalty_step(fused, x, g, torch.float32)
    close("grad_x", got[0], expect[0], base[0])
    if train:
        assert expect[1].abs().max() > 1e-3  # nonzero through the batch statistics: the check can fail
        close("x.grad", got[1], expect[1], base[1])
    for name, e in expect[2].items():
        assert got[2][name] is not None, name
        close(f"{name}.grad", got[2][name], e, base[2][name])
    assert expect[2]["conv1.weight"].abs().max() > 1e-3
    return got


@pytest.mark.parametrize("backend, train", [p for p in cpu_backend_modes() if p.values[1]])
@pytest.mark.parametrize("case", CASES)
def test_double_backward_in_train_mode_matches_fp64_eager(backend, train, case):
    check(CASES[case], backend, train)


@pytest.mark.parametrize("backend, train", [p for p in cpu_backend_modes() if p.values[1]])
def test_double_backward_with_a_running_statistics_norm_in_a_training_block(backend, train):
    check(CASES["projection"], backend, train, frozen_bn2=True)


@pytest.mark.parametrize("backend, train", [p for p in cpu_backend_modes() if not p.values[1]])
@pytest.mark.parametrize("case", CASES)
def test_double_backward_in_eval_mode_matches_fp64_eager(backend, train, case, allow_tf32):
    # TF32 off: the CUDA kernel (cuda_emulated) follows torch.backends.cudnn.allow_tf32, like eager's cuDNN;
    # its ~5e-5 TF32 rounding would flip ReLU masks near the kink and move the penalty's gradient by O(1).
    allow_tf32(False)
    check(CASES[case], backend, train)
