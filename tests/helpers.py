"""Helpers shared by the correctness tests."""

import torch
from torch import nn

from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.common import tolerance


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


def mean_rel_errors(actual, expected):
    """(mean signed error, mean abs error) of actual vs expected, both
    divided by max |expected|, in float64."""
    diff = actual.double() - expected.double()
    scale = expected.double().abs().max().clamp_min(1e-30)
    return (diff.mean() / scale).item(), (diff.abs().mean() / scale).item()


def assert_close_to_reference(actual, expected_fp64, eager_at_dtype, factor=tolerance.FACTOR,
                              floor=tolerance.FLOOR, mean_error=False):
    """The fused result's error vs fp64 is within the package's one tolerance
    rule (resnext_kernels.common.tolerance): its max error at most `factor`
    x eager PyTorch's error at the same dtype, plus `floor` (relative to the
    reference's largest magnitude) for when PyTorch happens to be exact.
    mean_error: also bound the mean signed error (tolerance.mean_error_bound:
    a systematic rounding bias fails even where the max error passes); for
    outputs of at least tolerance.MIN_MEAN_ERROR_ELEMENTS elements (the GPU
    tests).

    `expected_fp64` is the fp64 reference; `eager_at_dtype` is PyTorch's own
    result at the tested dtype (its error sets the scale). Errors are taken
    relative to max |expected|, so the bounds use scale=1.
    """
    assert torch.isfinite(actual).all(), "output has NaN/Inf (unwritten or overflowed elements)"
    err = max_rel_error(actual, expected_fp64)
    eager_err = max_rel_error(eager_at_dtype, expected_fp64)
    bound = tolerance.error_bound(eager_err, 1.0, factor, floor)
    assert err <= bound, f"max rel error {err:.3e} > {factor} x eager error {eager_err:.3e} + {floor:.0e}"
    if mean_error:
        assert actual.numel() >= tolerance.MIN_MEAN_ERROR_ELEMENTS, \
            f"{actual.numel()} elements: too few for the mean-error rule (>= {tolerance.MIN_MEAN_ERROR_ELEMENTS})"
        bias, _ = mean_rel_errors(actual, expected_fp64)
        eager_bias, eager_mae = mean_rel_errors(eager_at_dtype, expected_fp64)
        bias_bound = tolerance.mean_error_bound(eager_bias, eager_mae, 1.0, factor, floor)
        assert abs(bias) <= bias_bound, (
            f"mean signed rel error {bias:+.3e} (a rounding bias): bound {bias_bound:.3e} from eager's mean "
            f"{eager_bias:+.3e} and mean abs error {eager_mae:.3e}")
    return err, eager_err


def assert_same_arithmetic(actual, expected, msg=""):
    """actual and expected come from the same kernel arithmetic cut into
    other shapes (layouts, batch chunks, tiles): bitwise equal on a GPU; on
    CPU, where BLAS's last bit depends on the product's shape, within
    tolerance.blas_rounding_bound (a few ulps of the largest value, far
    below what an indexing bug gives). Non-finite values must match exactly."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    if actual.is_cuda:
        assert torch.equal(actual, expected), f"{msg}: not bitwise equal on {actual.device}"
        return
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{msg}: non-finite positions differ"
    torch.testing.assert_close(actual[~finite], expected[~finite], rtol=0, atol=0, equal_nan=True, msg=msg)
    diff = (actual[finite].double() - expected[finite].double()).abs().max().item() if finite.any() else 0.0
    bound = tolerance.blas_rounding_bound(expected[finite]) if finite.any() else 0.0
    assert diff <= bound, f"{msg}: differ by {diff:.3e} > {tolerance.BLAS_ROUNDING_ULPS} ulps of the max ({bound:.3e})"


def fp64_cpu(tensors):
    """The tensors (None kept) as float64 CPU copies: the reference's inputs."""
    return [None if t is None else t.detach().to("cpu", torch.float64) for t in tensors]


def assert_op_matches_reference(y, inputs, conv, **kwargs):
    """y, the op's output for `inputs` ([x, w1, b1, w2, b2, w3, b3, wd, bd]
    on any device) and conv = (stride, dilation, groups), within the
    tolerance rule (assert_close_to_reference, kwargs passed on): the
    reference is the block in float64 on CPU, the yardstick eager PyTorch
    (the reference backend) at the inputs' dtype on their device."""
    expected = bottleneck_inference_reference(*fp64_cpu(inputs), *conv)
    eager = bottleneck_inference_reference(*inputs, *conv)
    return assert_close_to_reference(y.detach().cpu(), expected, eager.cpu(), **kwargs)


class Block:
    """One folded-block test case: (N, Cin, width, Cout, groups, H, W, stride, dilation, projection).

    `make` returns the op's tensor arguments [x, w1, b1, w2, b2, w3, b3, wd, bd].
    """

    def __init__(self, n, cin, width, cout, groups, h, w, stride=1, dilation=1, projection=False):
        self.n, self.cin, self.width, self.cout, self.groups = n, cin, width, cout, groups
        self.h, self.w, self.stride, self.dilation, self.projection = h, w, stride, dilation, projection

    def __repr__(self):
        kind = "proj" if self.projection else "id"
        return (f"N{self.n}_Cin{self.cin}_w{self.width}_Cout{self.cout}_g{self.groups}_d{self.width // self.groups}"
                f"_{self.h}x{self.w}_s{self.stride}_dil{self.dilation}_{kind}")

    def make(self, dtype=torch.float32, device="cpu", channels_last=True):
        """Fresh random fp64 inputs (scaled so activations stay O(1)), then cast."""
        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, dtype=torch.float64) * scale

        d = self.width // self.groups
        x = rnd(self.n, self.cin, self.h, self.w)
        w1 = rnd(self.width, self.cin, 1, 1, scale=self.cin ** -0.5)
        w2 = rnd(self.width, d, 3, 3, scale=(9 * d) ** -0.5)
        w3 = rnd(self.cout, self.width, 1, 1, scale=self.width ** -0.5)
        b1, b2, b3 = rnd(self.width, scale=0.3), rnd(self.width, scale=0.3), rnd(self.cout, scale=0.3)
        wd = rnd(self.cout, self.cin, 1, 1, scale=self.cin ** -0.5) if self.projection else None
        bd = rnd(self.cout, scale=0.3) if self.projection else None
        tensors = [x, w1, b1, w2, b2, w3, b3, wd, bd]
        out = [None if t is None else t.to(dtype=dtype, device=device) for t in tensors]
        if channels_last:
            out[0] = out[0].contiguous(memory_format=torch.channels_last)
        return out

    @property
    def conv(self):
        return self.stride, self.dilation, self.groups


def fake_timer(seconds):
    """A stand-in for tuning's timers: time(c) records c and returns seconds[c].
    Returns (time, list of the candidates timed so far)."""
    timed = []

    def time(candidate):
        timed.append(candidate)
        return seconds[candidate]

    return time, timed
