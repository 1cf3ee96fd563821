"""The tolerance rules themselves (resnext_kernels.common.tolerance, used through
helpers.assert_close_to_reference): the mean-error rule catches a systematic
rounding bias that the max-error rule lets through, and passes correct results."""

import pytest
import torch
from helpers import Block, assert_close_to_reference, mean_rel_errors

from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.common import tolerance

F64 = torch.float64


def round_toward_zero_fp16(v):
    """v (float64) rounded to float16 toward zero, the biased rounding mode a
    kernel epilogue could use by mistake (round-to-nearest, then one ulp back
    toward zero wherever that overshot)."""
    nearest = v.to(torch.float16)
    overshot = (nearest.double().abs() > v.abs()) & (nearest != 0)
    # One ulp toward zero: the magnitude bits less one, whatever the sign bit.
    back = (nearest.view(torch.int16) - 1).view(torch.float16)
    return torch.where(overshot, back, nearest)


def test_mean_error_bound_formula():
    assert tolerance.mean_error_bound(-0.01, 0.02, 4.0) == pytest.approx(0.02 + 4e-6)  # 2x eager's |mean|
    assert tolerance.mean_error_bound(0.001, 0.02, 4.0) == pytest.approx(0.005 + 4e-6)  # a quarter of its mean abs
    assert tolerance.mean_error_bound(0.0, 0.0, 4.0, floor=0.0) == 0.0


def test_mean_error_rule_catches_a_bias_the_max_rule_passes():
    """Synthetic values in one binade ([1, 2): one fp16 ulp is 2**-10):
    "eager" and another correct implementation err by noise of 0.3 ulp plus
    round-to-nearest; rounding the exact values toward zero errs by under
    one ulp (within 2x eager's max error) but always downward."""
    n = 100_000
    expected = torch.rand(n, dtype=F64) + 1.0
    ulp = 2.0 ** -10

    def noisy():
        return (expected + torch.randn(n, dtype=F64) * 0.3 * ulp).to(torch.float16)

    eager, other = noisy(), noisy()
    toward_zero = round_toward_zero_fp16(expected)
    assert (toward_zero.double() <= expected).all() and (expected - toward_zero.double()).max() < ulp
    assert_close_to_reference(other, expected, eager, mean_error=True)
    assert_close_to_reference(toward_zero, expected, eager)  # the max-error rule alone passes it
    with pytest.raises(AssertionError, match="rounding bias"):
        assert_close_to_reference(toward_zero, expected, eager, mean_error=True)


def test_mean_error_rule_on_a_block():
    """A real block's output in fp16 (5184 elements): the exact result
    rounded to nearest passes the mean-error rule; rounded toward zero its
    mean error is over the bound (its max error is 1.0-2.3x eager's, so
    the max-error rule may or may not catch it)."""
    block = Block(2, 32, 64, 32, 16, 9, 9)
    inputs = block.make(torch.float16)
    expected = bottleneck_inference_reference(*[t.double() for t in inputs if t is not None], None, None,
                                              *block.conv)
    eager = bottleneck_inference_reference(*inputs, *block.conv)
    assert_close_to_reference(expected.to(torch.float16), expected, eager, mean_error=True)
    bias, _ = mean_rel_errors(round_toward_zero_fp16(expected), expected)
    assert abs(bias) > tolerance.mean_error_bound(*mean_rel_errors(eager, expected), 1.0)


def test_mean_error_rule_refuses_small_outputs():
    expected = torch.rand(100, dtype=F64)
    with pytest.raises(AssertionError, match="too few"):
        assert_close_to_reference(expected.float(), expected, expected.half(), mean_error=True)
