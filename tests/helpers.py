"""Helpers shared by the correctness tests."""

import torch
from torch import nn


def randomize_norms(module, generator=None):
    """Give every BatchNorm/FrozenBatchNorm random affine params and running stats.

    Fresh modules have gamma=1, beta=0, mean=0, var=1, which would hide folding
    mistakes; this makes every BN do real work.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def max_rel_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_close_to_reference(actual, expected_fp64, eager_at_dtype, factor=2.0, floor=1e-6):
    """The fused result's error vs fp64 is at most `factor` x eager PyTorch's error at the same dtype.

    `expected_fp64` is the fp64 reference; `eager_at_dtype` is PyTorch's own
    result at the tested dtype (its error sets the scale). `floor` is a
    relative floor for when PyTorch happens to be (nearly) exact.
    """
    assert torch.isfinite(actual).all(), "output has NaN/Inf (unwritten or overflowed elements)"
    err = max_rel_error(actual, expected_fp64)
    eager_err = max_rel_error(eager_at_dtype, expected_fp64)
    bound = factor * eager_err + floor
    assert err <= bound, f"max rel error {err:.3e} > {factor} x eager error {eager_err:.3e} + {floor:.0e}"
    return err, eager_err
