"""A random sweep of every fused path on a GPU against float64 (marked `cuda`,
skipped on CPU with the reason): the GPU check's sweep stage
(scripts/gpu_check.sh) runs this file on its own.

Paths (PATHS), each in bf16, fp16 and fp32 (TF32 off, so eager fp32 is a true
fp32 yardstick): inference on the cuda and the triton backend, training on
triton (batch statistics, forward + backward), and the fine-tuning backward:
forward + backward through the inference op with frozen (eval-mode)
BatchNorm and some parameters frozen, on triton and cuda. That path's
backward is ATen today; issue 22's fused backward runs here as soon as the
inference op routes to it, with no change to this file (the slot the issue
asks for).

Every test draws fresh configurations from its seed (conftest: a failure
prints the command that replays it): cardinality, d in {1, 4, 8, 14, 16, 64},
channel counts off multiples of 16, odd H/W, stride 2, dilation 2, identity or
projection. The tolerance is the package's rule (tests/helpers.py; factor 3
for the training-style comparisons, training_cases.close). The fixed GPU
cases live in test_*_gpu.py; this file adds shapes nobody picked.
"""

import copy

import pytest
import torch
from cuda_cases import _check, _cuda_run, needs_cuda
from helpers import Block
from training_cases import F64, TrainCase, close, random_case, run_steps, step
from triton_cases import HAS_CUDA, _check_block, needs_triton

from resnext_kernels import FusedResNeXtBlock

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")]

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]
# Configurations drawn per test: the Triton paths compile their kernels for
# each new shape (~1-3 s per kernel), training runs ~12 kernels a step.
CASES_PER_TEST = {"inference": 4, "training": 1, "finetune": 2}


def _pick(options):
    return options[int(torch.randint(len(options), ()))]


def random_block():
    """An inference Block drawn from the seed: up to 64 groups' worth of
    channels, sizes a GPU runs in milliseconds and the fp64 CPU reference in
    well under a second."""
    d = _pick([1, 4, 8, 14, 16, 64])
    groups = _pick([g for g in (1, 2, 3, 4, 8, 32) if g * d <= 512])
    cout = _pick([24, 40, 64, 72, 136, 256])
    stride, dilation = _pick([1, 2]), _pick([1, 2])
    identity = stride == 1 and _pick([True, False])
    cin = cout if identity else _pick([8, 20, 48, 64, 100, 256])
    hw = _pick([5, 7, 9, 13, 17, 19])
    return Block(_pick([1, 2, 3]), cin, groups * d, cout, groups, hw, _pick([hw, hw - 2]), stride, dilation,
                 projection=not identity)


def _tf32_off_for_fp32(dtype, allow_tf32):
    """fp32 runs with TF32 off (eager fp32 is then a true fp32 yardstick);
    returns the kernels' tf32 argument."""
    if dtype == torch.float32:
        allow_tf32(False)
        return False
    return True


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_triton_inference(dtype, allow_tf32, poisoned_empty):
    tf32 = False if dtype == torch.float32 else None
    for _ in range(CASES_PER_TEST["inference"]):
        block = random_block()
        try:
            _check_block(block, dtype, tf32, "cuda", allow_tf32, poisoned_empty)
        except AssertionError as exc:
            raise AssertionError(f"{block!r}: {exc}") from None


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_cuda_inference(dtype, allow_tf32):
    tf32 = _tf32_off_for_fp32(dtype, allow_tf32)
    for _ in range(CASES_PER_TEST["inference"]):
        block = random_block()
        args = block.make(dtype, device="cuda")
        try:
            _check(_cuda_run(args, block, tf32), args, block, dtype, tf32, "cuda")
        except AssertionError as exc:
            raise AssertionError(f"{block!r}: {exc}") from None


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_triton_training(dtype, allow_tf32):
    """Two steps (outputs, running statistics; in fp32 every gradient too:
    run_steps says why 16-bit gradients are compared elsewhere)."""
    allow_tf32(False)
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    for _ in range(CASES_PER_TEST["training"]):
        case = random_case(gen)
        try:
            run_steps(case, dtype, device="cuda", check_grads=dtype == torch.float32)
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None


# ---------------------------------------------------------------- fine-tuning backward
# Inputs whose eval-mode pre-activations come this close to ReLU's kink are
# redrawn, as training_cases.draw_input does for batch statistics.
KINK_MARGIN = 2e-5


def _eval_relu_inputs(block, x):
    with torch.no_grad():
        t1 = block.bn1(block.conv1(x))
        t2 = block.bn2(block.conv2(t1.relu()))
        shortcut = x if block.downsample is None else block.downsample(x)
        return t1, t2, block.bn3(block.conv3(t2.relu())) + shortcut


def _draw_eval_input(case, block, tries=100):
    for _ in range(tries):
        x = torch.randn(case.n, case.inplanes, case.h, case.w, dtype=F64)
        if all(t.abs().min() > KINK_MARGIN for t in _eval_relu_inputs(block, x)):
            return x
    raise AssertionError(f"{tries} inputs in a row had a pre-activation within {KINK_MARGIN} of 0")


def _finetune_case(gen):
    case = random_case(gen)
    # Frozen statistics want tracked running stats; batch-statistics options do not apply.
    return TrainCase(case.inplanes, case.planes, case.groups, case.base_width, case.h, case.w, case.stride,
                     case.dilation, eps=case.eps, affine=case.affine)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_finetune_backward(backend, dtype, allow_tf32):
    """Eval-mode BatchNorm (mmdetection's norm_eval; FrozenBatchNorm2d folds
    the same way), forward + backward: the output at every dtype, and in
    fp32 the gradient of x and of every trainable parameter; frozen
    parameters (requires_grad False, drawn per case) get no gradient."""
    allow_tf32(False)
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    for _ in range(CASES_PER_TEST["finetune"]):
        case = _finetune_case(gen)
        ref = case.torchvision_block().eval()
        frozen = [name for name, _ in ref.named_parameters() if _pick([True, False, False])]
        for name, p in ref.named_parameters():
            p.requires_grad_(name not in frozen)
        eager = copy.deepcopy(ref).to("cuda", dtype)
        fused = FusedResNeXtBlock.from_bottleneck(ref, backend=backend).to("cuda", dtype).eval()
        for name, p in fused.named_parameters():
            p.requires_grad_(name not in frozen)
        assert not fused.uses_batch_statistics()
        x = _draw_eval_input(case, ref)
        ho, wo = (case.h - 1) // case.stride + 1, (case.w - 1) // case.stride + 1
        grad = torch.randn(case.n, 4 * case.planes, ho, wo, dtype=F64)
        expect, base, got = (step(ref, x, grad, F64, "cpu"), step(eager, x, grad, dtype, "cuda"),
                             step(fused, x, grad, dtype, "cuda"))
        try:
            close("out", got[0], expect[0], base[0])
            assert {n for n, g in got[2].items() if g is None} == set(frozen), "frozen parameters got gradients"
            if dtype == torch.float32:
                close("x.grad", got[1], expect[1], base[1])
                for name, g in expect[2].items():
                    if g is not None:
                        close(f"{name}.grad", got[2][name], g, base[2][name])
        except AssertionError as exc:
            raise AssertionError(f"{case} frozen={frozen}: {exc}") from None
