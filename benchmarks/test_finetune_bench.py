"""Fine-tuning step (forward + backward) of canonical blocks with
FrozenBatchNorm2d (detection backbones), bf16 autocast, channels_last, on a
GPU (the GPU check's `finetune` stage runs s1-s3 at --bench-batch 32):
eager AMP (torchvision) against the fused path (the inference op's triton
forward and fused backward, resnext_kernels/backends/triton/inference_backward.py).
GPU only: every case skips on CPU with the reason.

Each case records in extra_info: shape, impl, batch, the derived HBM bytes
of one step (bench.finetune_counts.finetune_step_bytes, fused and eager) and
the GB/s that makes, the first call's seconds, the output's and x.grad's max
difference from eager AMP's (informative: bf16), and the peak memory of a step.
"""

import pytest
import torch

from resnext_kernels.bench.cases import make_block, shape_seed
from resnext_kernels.bench.finetune import freeze_batchnorm
from resnext_kernels.bench.finetune_counts import finetune_step_bytes
from resnext_kernels.bench.measure import device_name
from resnext_kernels.bench.shapes import SHAPES, dtype_name
from resnext_kernels.bench.training import (
    TRAIN_DTYPE,
    build_training_step,
    peak_step_bytes,
    time_step,
    train_impl_unavailable_reason,
)

FINETUNE_IMPLS = ("eager_amp", "triton")
CASES = [(shape, impl) for shape in SHAPES for impl in FINETUNE_IMPLS]


@pytest.mark.parametrize("shape,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_finetune_block(benchmark, bench_settings, call_or_fail, shape, impl):
    s = bench_settings
    reason = train_impl_unavailable_reason("eager_amp", s.device)
    if reason is not None:
        pytest.skip(reason.replace("training benchmark", "fine-tuning benchmark"))
    if shape not in s.shapes:
        pytest.skip(f"shape {shape} not selected (--bench-shapes)")
    bs = s.shapes[shape]
    block = freeze_batchnorm(make_block(bs, shape_seed(bs, s.seed)))
    gen = torch.Generator(device=s.device).manual_seed(s.seed)
    x = torch.randn(s.batch, bs.cin, bs.hw, bs.hw, generator=gen, device=s.device, dtype=TRAIN_DTYPE)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(s.batch, bs.cout, bs.out_hw, bs.out_hw, generator=gen, device=s.device, dtype=TRAIN_DTYPE)
    grad = grad.contiguous(memory_format=torch.channels_last)
    step, info = call_or_fail(build_training_step, impl, block, s.device, x, grad)
    x_grad = x.grad.clone()
    x.grad = None
    eager_step, eager = call_or_fail(build_training_step, "eager_amp", block, s.device, x, grad)
    derived = finetune_step_bytes(bs, s.batch, TRAIN_DTYPE)
    benchmark.group = f"finetune-{shape}-b{s.batch}"
    benchmark.extra_info.update(
        finetune=True, shape=shape, spec=bs.spec(), impl=impl, batch=s.batch, dtype=dtype_name(TRAIN_DTYPE),
        device=device_name(s.device), seed=s.seed, first_call_s=info["first_call_s"],
        max_abs_diff_vs_eager=(info["output"].float() - eager["output"].float()).abs().max().item(),
        x_grad_max_abs_diff_vs_eager=(x_grad.float() - x.grad.float()).abs().max().item(),
        derived_fused_bytes=derived["fused"], derived_eager_bytes=derived["eager"])
    x.grad = None
    call_or_fail(time_step, benchmark, step, x, s.device, s.seconds)
    if benchmark.stats is not None:
        own = derived["fused"] if impl == "triton" else derived["eager"]
        benchmark.extra_info["achieved_GBps"] = own / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["peak_mem_bytes"] = call_or_fail(peak_step_bytes, step, x, s.device)
