"""Training step (forward + backward) of each canonical block and of
resnext50_32x4d, bf16 autocast, channels_last, batch 128 (--bench-batch) on a
GPU: eager AMP, the fused triton training path, torch.compile of eager AMP
(resnext_kernels/bench/training.py). GPU only: every case skips on CPU with
the reason.

Each case records in extra_info: shape (or model), impl, batch, the derived
HBM bytes of one step (bench.shapes.training_step_bytes, fused and eager)
and the GB/s that makes, the first call's seconds (compile, Triton JIT),
the output's max difference from eager AMP's (informative: bf16), and the
peak memory of a step. The groups put the implementations of one shape
side by side; bench_report adds "vs eager" and "vs compile".
"""

import pytest
import torch

from resnext_kernels.bench.cases import make_block, make_model, shape_seed
from resnext_kernels.bench.measure import device_name
from resnext_kernels.bench.shapes import SHAPES, dtype_name, training_step_bytes
from resnext_kernels.bench.training import (
    TRAIN_DTYPE,
    TRAIN_IMPLS,
    build_training_step,
    peak_step_bytes,
    time_step,
    train_impl_unavailable_reason,
)

CASES = [(shape, impl) for shape in SHAPES for impl in TRAIN_IMPLS]  # shape-major: a time limit cuts whole shapes
MODEL_RESOLUTION = 224


@pytest.mark.parametrize("shape,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_training_block(benchmark, bench_settings, call_or_fail, shape, impl):
    s = bench_settings
    reason = train_impl_unavailable_reason(impl, s.device)
    if reason is not None:
        pytest.skip(reason)
    if shape not in s.shapes:
        pytest.skip(f"shape {shape} not selected (--bench-shapes)")
    bs = s.shapes[shape]
    block = make_block(bs, shape_seed(bs, s.seed)).train()
    gen = torch.Generator(device=s.device).manual_seed(s.seed)
    x = torch.randn(s.batch, bs.cin, bs.hw, bs.hw, generator=gen, device=s.device, dtype=TRAIN_DTYPE)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(s.batch, bs.cout, bs.out_hw, bs.out_hw, generator=gen, device=s.device, dtype=TRAIN_DTYPE)
    grad = grad.contiguous(memory_format=torch.channels_last)
    step, info = call_or_fail(build_training_step, impl, block, s.device, x, grad)
    eager_out = call_or_fail(build_training_step, "eager_amp", block, s.device, x, grad)[1]["output"]
    derived = training_step_bytes(bs, s.batch, TRAIN_DTYPE)
    benchmark.group = f"train-{shape}"
    benchmark.extra_info.update(
        training=True, shape=shape, spec=bs.spec(), impl=impl, batch=s.batch, dtype=dtype_name(TRAIN_DTYPE),
        device=device_name(s.device), seed=s.seed, first_call_s=info["first_call_s"],
        max_abs_diff_vs_eager=(info["output"].float() - eager_out.float()).abs().max().item(),
        derived_fused_bytes=derived["fused"], derived_eager_bytes=derived["eager"])
    call_or_fail(time_step, benchmark, step, x, s.device, s.seconds)
    if benchmark.stats is not None:
        own = derived["fused"] if impl == "triton" else derived["eager"]
        benchmark.extra_info["achieved_GBps"] = own / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["peak_mem_bytes"] = call_or_fail(peak_step_bytes, step, x, s.device)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_training_model(benchmark, bench_settings, call_or_fail, impl):
    s = bench_settings
    reason = train_impl_unavailable_reason(impl, s.device)
    if reason is not None:
        pytest.skip(reason)
    model = make_model(s.seed).train()
    gen = torch.Generator(device=s.device).manual_seed(s.seed)
    x = torch.randn(s.batch, 3, MODEL_RESOLUTION, MODEL_RESOLUTION, generator=gen, device=s.device,
                    dtype=TRAIN_DTYPE).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(s.batch, 1000, generator=gen, device=s.device, dtype=TRAIN_DTYPE)
    step, info = call_or_fail(build_training_step, impl, model, s.device, x, grad, True)
    benchmark.group = f"train-resnext50-b{s.batch}"
    benchmark.extra_info.update(training=True, model="resnext50_32x4d", shape="resnext50_32x4d", impl=impl,
                                batch=s.batch, resolution=MODEL_RESOLUTION, dtype=dtype_name(TRAIN_DTYPE),
                                device=device_name(s.device), seed=s.seed, first_call_s=info["first_call_s"])
    call_or_fail(time_step, benchmark, step, x, s.device, s.seconds * 3)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = s.batch / benchmark.stats.stats.median
    benchmark.extra_info["peak_mem_bytes"] = call_or_fail(peak_step_bytes, step, x, s.device)
