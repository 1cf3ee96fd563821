"""One ResNeXt bottleneck block: fused backends vs eager and torch.compile.

Parametrized in conftest.py over shape x dtype x impl; unusable cases skip
with the reason. Each case records in extra_info the FLOPs, the bytes floor,
achieved GB/s and TFLOP/s, the time floor and % of it (ceilings measured once
per run), and the max error vs a float64 reference. A fused backend whose
error exceeds the tolerance (2x eager PyTorch's own error at the dtype plus
one ulp) fails the test after its timing is recorded.
"""

import pytest

from resnext_kernels.bench.cases import FUSED_IMPLS
from resnext_kernels.bench.measure import (
    RotatingTarget,
    device_name,
    performance,
    plan_rounds,
)
from resnext_kernels.bench.shapes import parse_dtype
from resnext_kernels.common.timing import round_seconds


def test_block(benchmark, bench_settings, device_settings, ceilings, case_cache, call_or_fail, shape, dtype,
               impl):
    s = bench_settings
    torch_dtype = parse_dtype(dtype)
    reason = s.skip_reason(impl, torch_dtype)
    if reason is not None:
        pytest.skip(reason)
    case = call_or_fail(case_cache.get, shape, torch_dtype)
    fn, info, error = call_or_fail(case.build, impl)
    inputs = case.inputs_for(impl)

    benchmark.group = f"{shape}-{dtype}"
    benchmark.extra_info.update(
        shape=shape, spec=case.shape.spec(), batch=s.batch, dtype=dtype, impl=impl, seed=s.seed,
        n_inputs=len(inputs), device=device_name(s.device), **device_settings, **info,
        **case.error_info(error))
    calib = call_or_fail(round_seconds, fn, inputs, s.device, 1)[0] * len(inputs)
    call_or_fail(lambda: benchmark.pedantic(RotatingTarget(fn, inputs, s.device), iterations=len(inputs),
                                            warmup_rounds=1, rounds=plan_rounds(calib, s.seconds)))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(
            performance(case.shape, s.batch, torch_dtype, benchmark.stats.stats.median, ceilings,
                        len(inputs)))
        benchmark.extra_info["ceilings"] = ceilings.as_dict()
    ok = impl not in FUSED_IMPLS or error <= case.tolerance
    message = (f"{impl} {shape} {dtype}: max abs error {error:.3g} > tolerance {case.tolerance:.3g} "
               f"(eager {dtype} error {case.eager_error:.3g})")
    del fn, inputs, case  # a failed assert keeps the frame's locals alive (see call_or_fail)
    assert ok, message
