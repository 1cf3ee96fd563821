"""The fused training path on a GPU (marked `cuda`; skipped on CPU with the
reason): compiled Triton kernels at realistic sizes, bf16 included (the
interpreter's bf16 dots are broken, so bf16 is GPU-only), determinism,
autocast, and the block inside a compiled model. The float64 reference runs
on the CPU. Unverified until a GPU runs them (docs/training.md).
"""

import pytest
import torch
from training_cases import (
    HAS_CUDA,
    TrainCase,
    check_backward_on_same_state,
    close,
    models,
    run_steps,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")]

# ResNeXt-50 32x4d stages at batch 2 (s1 at 28x28 to keep the CPU reference
# quick), the CIFAR ResNeXt-29 8x64d stage (d = 64, GT = 64), and an odd
# block (d = 14 padded to 16, 15x15, stride 2, channel counts not multiples of 16).
GPU_CASES = [
    pytest.param(TrainCase(256, 64, 32, 4, 28, 28), id="s1-like"),
    pytest.param(TrainCase(256, 128, 32, 4, 28, 28, stride=2), id="s2_first-like"),
    pytest.param(TrainCase(1024, 256, 32, 4, 14, 14), id="s3"),
    pytest.param(TrainCase(2048, 512, 32, 4, 7, 7, momentum=None), id="s4"),
    pytest.param(TrainCase(256, 64, 8, 64, 16, 16), id="cifar29-like"),
    pytest.param(TrainCase(72, 28, 2, 32, 15, 15, stride=2, dilation=2), id="odd-d14"),
]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES)
def test_two_steps_on_gpu(case, dtype, allow_tf32):
    """Output and running statistics (and in fp32 every gradient) of two
    steps vs float64 torchvision, within 3x eager's error at the dtype
    (16-bit gradients: next test). TF32 off, so that eager fp32 is fp32."""
    allow_tf32(False)
    run_steps(case, dtype, device="cuda", check_grads=dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_16bit_backward_on_the_same_forward_state_on_gpu(case, dtype):
    check_backward_on_same_state(case, dtype, device="cuda")


def test_identical_steps_are_bitwise_identical_on_gpu(allow_tf32):
    allow_tf32(True)
    case = TrainCase(256, 128, 32, 4, 28, 28, stride=2)
    _, _, fused = models(case, torch.bfloat16, "triton", "cuda")
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(4, 256, 28, 28, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        fused.load_state_dict(state)
        fused.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = fused(xi)
        y.backward(y.detach() * 0.5 + 0.25)
        runs.append([y, xi.grad] + [p.grad for p in fused.parameters()] + list(fused.buffers()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_autocast_matches_eager_amp():
    """fp32 parameters under torch.autocast(bfloat16), as in AMP training:
    the fused block's output is within 3x eager AMP's error against float64
    (training_cases.close), and its parameters' gradients are fp32."""
    case = TrainCase(256, 64, 32, 4, 14, 14)
    ref, eager, fused = models(case, torch.float32, "triton", "cuda")
    x = torch.randn(2, 256, 14, 14, dtype=torch.float64)
    xs = x.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager, y_fused = eager(xs), fused(xs)
    y_ref = ref(x)
    assert y_fused.dtype == torch.bfloat16
    close("out", y_fused.detach(), y_ref.detach(), y_eager.detach())
    y_fused.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
