"""Whole model: torchvision resnext50_32x4d (random init, eval), bfloat16, channels_last.

Eager vs torch.compile vs the model converted with resnext_kernels.convert
for each usable fused backend. extra_info: images/s, peak memory of one
forward (CUDA), and the logits' max error vs a float64 CPU reference on the
first images (compare with the eager case of the same group; not asserted: a
random-init network's logits are not a calibrated accuracy check).
Sizes: model_defaults (batch 64 and 128 at 224 on CUDA; batch 1 at 64
on CPU). Parametrized in conftest.py.
"""

import pytest
import torch

from resnext_kernels.bench.cases import (
    ERROR_BATCH,
    build_model_impl,
    make_model,
    max_abs_error,
    model_defaults,
    model_impl_unavailable_reason,
    peak_memory,
)
from resnext_kernels.bench.measure import (
    RotatingTarget,
    device_name,
    plan_rounds,
    rotation_count,
)
from resnext_kernels.bench.shapes import dtype_name
from resnext_kernels.common.timing import round_seconds

DTYPE = torch.bfloat16


class _ModelCase:
    """Model, rotating inputs and float64 reference logits for one batch size (most recent only)."""

    def __init__(self):
        self.key = self.inputs = None

    def get(self, s, batch):
        if self.key != batch:
            self.key = self.inputs = None  # free the previous batch's inputs first
            res = model_defaults(s.device)["resolution"]
            self.model = make_model(s.seed)
            gen = torch.Generator(device=s.device).manual_seed(s.seed)
            x_bytes = batch * 3 * res * res * 2
            self.inputs = [torch.randn(batch, 3, res, res, generator=gen, device=s.device, dtype=DTYPE)
                           .contiguous(memory_format=torch.channels_last)
                           for _ in range(rotation_count(x_bytes, s.device))]
            x64 = self.inputs[0][: ERROR_BATCH].to("cpu", torch.float64)
            with torch.no_grad():
                self.y_ref = self.model.double()(x64)
            self.model.float()
            self.resolution = res
            self.key = batch
        return self


@pytest.fixture(scope="module")
def model_cache():
    return _ModelCase()


def test_model(benchmark, bench_settings, device_settings, model_cache, call_or_fail, model_batch, model_impl):
    s = bench_settings
    reason = model_impl_unavailable_reason(model_impl, s.device, DTYPE, s.compile_dtypes)
    if reason is not None:
        pytest.skip(reason)
    case = call_or_fail(model_cache.get, s, model_batch)
    fn, info = call_or_fail(build_model_impl, model_impl, case.model, s.device, DTYPE, case.inputs[0])
    k = ERROR_BATCH
    benchmark.group = f"resnext50-b{model_batch}"
    benchmark.extra_info.update(
        model="resnext50_32x4d", batch=model_batch, resolution=case.resolution, dtype=dtype_name(DTYPE),
        impl=model_impl, seed=s.seed, n_inputs=len(case.inputs), device=device_name(s.device),
        max_abs_err=max_abs_error(fn(case.inputs[0])[:k], case.y_ref),
        ref_max_abs=case.y_ref.abs().max().item(), **device_settings, **info)
    calib = call_or_fail(round_seconds, fn, case.inputs, s.device, 1)[0] * len(case.inputs)
    call_or_fail(lambda: benchmark.pedantic(RotatingTarget(fn, case.inputs, s.device),
                                            iterations=len(case.inputs), warmup_rounds=1,
                                            rounds=plan_rounds(calib, s.seconds * 3)))
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = model_batch / benchmark.stats.stats.median
    if s.device.type == "cuda":
        before, peak = peak_memory(fn, case.inputs[0], s.device)
        benchmark.extra_info.update(resident_bytes=before, peak_mem_bytes=peak)
