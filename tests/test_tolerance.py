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


def _round_to_tf32(t):
    """fp32 -> the nearest TF32 value (10 mantissa bits), as tensor cores read fp32 operands in TF32 mode."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("block", [Block(2, 64, 128, 64, 32, 9, 9), Block(1, 48, 64, 96, 2, 7, 7, projection=True)],
                         ids=repr)
def test_max_error_rule_catches_a_tf32_grouped_conv(block):
    """The GPU tests' "TF32 leak" (the grouped conv run in TF32 while full
    fp32 was asked for): simulated here by rounding the grouped conv's
    operands to TF32, the fp32 block's error is far over the max-error bound
    set by eager fp32 (d = 4 and d = 32)."""
    f = torch.nn.functional
    x, w1, b1, w2, b2, w3, b3, wd, bd = block.make(torch.float32)
    stride, dilation, groups = block.conv
    expected = bottleneck_inference_reference(*[None if t is None else t.double() for t in
                                                (x, w1, b1, w2, b2, w3, b3, wd, bd)], *block.conv)
    eager = bottleneck_inference_reference(x, w1, b1, w2, b2, w3, b3, wd, bd, *block.conv)
    t1 = f.relu(f.conv2d(x, w1, b1))
    t2 = f.relu(f.conv2d(_round_to_tf32(t1), _round_to_tf32(w2), b2, stride, dilation, dilation, groups))
    shortcut = x if wd is None else f.conv2d(x, wd, bd, stride)
    leaked = f.relu(f.conv2d(t2, w3, b3) + shortcut)
    assert_close_to_reference(eager, expected, eager)
    with pytest.raises(AssertionError, match="max rel error"):
        assert_close_to_reference(leaked, expected, eager)


def test_same_arithmetic_rule_passes_last_bits_and_fails_indexing_bugs():
    """helpers.assert_same_arithmetic on CPU (issue 19): a result whose
    values moved by a last-bit BLAS difference (+-2 ulps) passes; the same
    result with one image's pixels shifted by one, or a NaN moved, fails."""
    from helpers import assert_same_arithmetic

    y = torch.randn(2, 8, 5, 7)
    nudged = y.clone()
    for _ in range(2):  # +-2 ulps at random positions
        pick = torch.rand(y.shape) < 0.1
        nudged = torch.where(pick, torch.nextafter(nudged, torch.full_like(y, torch.inf)), nudged)
        nudged = torch.where(~pick & (torch.rand(y.shape) < 0.1),
                             torch.nextafter(nudged, torch.full_like(y, -torch.inf)), nudged)
    assert not torch.equal(nudged, y)
    assert_same_arithmetic(nudged, y)
    shifted = y.clone()
    shifted[1] = y[1].flatten(1).roll(1, dims=1).reshape(y[1].shape)
    with pytest.raises(AssertionError, match="ulps of the max"):
        assert_same_arithmetic(shifted, y)
    with_nan, moved_nan = y.clone(), y.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    moved_nan[0, 0, 0, 1] = float("nan")
    with pytest.raises(AssertionError, match="non-finite positions differ"):
        assert_same_arithmetic(moved_nan, with_nan)
