"""The training benchmark's tooling on CPU (the benchmark itself is GPU-only):
what skips and why, one eager AMP training step through the builder, and
the training table of the report."""

import pytest
import torch
from training_cases import TrainCase

from resnext_kernels.bench import report as bench_report
from resnext_kernels.bench.training import (
    TRAIN_IMPLS,
    build_training_step,
    train_impl_unavailable_reason,
)


def test_every_impl_skips_on_cpu_with_a_reason():
    for impl in TRAIN_IMPLS:
        assert "CUDA only" in train_impl_unavailable_reason(impl, torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        train_impl_unavailable_reason("nope", torch.device("cpu"))


def test_build_training_step_runs_a_step_and_leaves_the_module_alone():
    case = TrainCase(16, 4, 4, 32, 5, 5)
    block = case.torchvision_block().float()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(2, 16, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(2, 16, 5, 5, dtype=torch.bfloat16)
    step, info = build_training_step("eager_amp", block, torch.device("cpu"), x, grad)
    assert info["output"].dtype == torch.bfloat16 and info["first_call_s"] > 0
    x.grad = None
    step(x)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for k, v in block.state_dict().items():  # the builder works on a copy
        assert torch.equal(v, before[k]), k


def _doc():
    def case(shape, impl, ms, **extra):
        info = {"training": True, "shape": shape, "impl": impl, "batch": 128, "dtype": "bfloat16", **extra}
        return {"group": f"train-{shape}", "name": f"test_training_block[{shape}-{impl}]", "extra_info": info,
                "stats": {"median": ms / 1e3}}

    return {"benchmarks": [case("s1", "eager_amp", 3.0), case("s1", "triton", 2.0, achieved_GBps=2630.0),
                           case("s1", "compile_amp", 2.5),
                           case("resnext50_32x4d", "triton", 200.0, model="resnext50_32x4d", images_per_s=640.0),
                           case("resnext50_32x4d", "eager_amp", 300.0, model="resnext50_32x4d")],
            "datetime": "2026-01-01T00:00:00", "version": "5.2.3", "commit_info": {"id": "abcdef1234567"}}


def test_report_has_a_training_table_with_speedups():
    md = bench_report.render([_doc()])
    assert "### Training step" in md
    assert "### Block" not in md and "### Whole model" not in md  # training rows stay in their table
    triton = next(line for line in md.splitlines() if line.startswith("| s1 | triton"))
    assert triton.split(" | ")[3:7] == ["2", "1.50x", "1.25x", "2.63e+03"]
    model = next(line for line in md.splitlines() if line.startswith("| resnext50_32x4d | triton"))
    assert model.split(" | ")[4] == "1.50x"
