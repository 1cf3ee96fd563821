"""The one rule for "close to PyTorch", used by the tests and the benchmarks.

A fused result is compared with a float64 reference, and so is eager
PyTorch's own result at the same dtype. PyTorch's error sets the scale.

Max error (every comparison): the fused result's max abs error may be at
most FACTOR times eager's, plus a floor of FLOOR times the reference's
largest magnitude (for when eager happens to be exact, e.g. a float64 run or
a tiny case). Relative to the reference's largest magnitude this is:
rel_err <= FACTOR * eager_rel_err + FLOOR.

Mean signed error (the GPU tests, outputs of at least
MIN_MEAN_ERROR_ELEMENTS elements): a systematic rounding bias (e.g. an
epilogue that rounds toward zero instead of to nearest) can stay within the
max-error bound, since it errs by under one ulp where round-to-nearest errs
by half an ulp, yet it shifts every value the same way. Its mean signed
error is about its mean abs error, whereas round-to-nearest errors cancel
in the mean. So |mean(fused - ref)| may be at most the larger of FACTOR
times eager's |mean(eager - ref)| and MEAN_ERROR_FRACTION times eager's
mean abs error, plus the same floor. Measured on CPU (fp16, blocks of
1.4k-10k output elements, 3 seeds): correct implementations (eager, the
Triton kernels) have |mean error| <= 0.08 x eager's mean abs error; the
exact result rounded toward zero has 1.1-1.4 x, while its max error is
only 1.0-1.4 x eager's, within the max-error bound. Below
MIN_MEAN_ERROR_ELEMENTS the mean of correct results is too noisy (0.15 x
at 144 elements) for the rule.

Same arithmetic, different BLAS shapes (CPU tests only): two results of the
same kernel arithmetic that differ only in how the work was cut (y's
layout, batch chunks, tiles spanning images or not) are bitwise equal on a
GPU, where each MMA tile computes the same sums whatever surrounds it. Under
the Triton interpreter `tl.dot` is numpy's matmul, and the last bit of an
OpenBLAS product depends on the CPU's kernels and on the product's shape
(OPENBLAS_CORETYPE=Haswell on AMD EPYC rounds an M=35 and an M=105 product
differently). There the two may differ by at most BLAS_ROUNDING_ULPS times
the dtype's eps times the result's largest magnitude: measured at most
1.2 x eps x max on two such tests (6 seeds each, Haswell kernels, fp32),
while an indexing bug (a wrong stride, a pixel shifted by one) errs by the
size of the values themselves.
"""

import torch

FACTOR = 2.0
FLOOR = 1e-6
MEAN_ERROR_FRACTION = 0.25
MIN_MEAN_ERROR_ELEMENTS = 4096
BLAS_ROUNDING_ULPS = 4


def error_bound(eager_error, scale, factor=FACTOR, floor=FLOOR):
    """The largest max-abs error vs the float64 reference a fused result may
    have, given eager PyTorch's max-abs error at the same dtype and
    scale = max |reference|."""
    return factor * eager_error + floor * scale


def mean_error_bound(eager_mean_error, eager_mean_abs_error, scale, factor=FACTOR, floor=FLOOR):
    """The largest |mean signed error| vs the float64 reference a fused
    result may have, given eager PyTorch's mean signed error and mean abs
    error at the same dtype and scale = max |reference|."""
    return max(factor * abs(eager_mean_error), MEAN_ERROR_FRACTION * eager_mean_abs_error) + floor * scale


def blas_rounding_bound(reference):
    """The largest max-abs difference allowed between `reference` and a
    result of the same arithmetic cut into other BLAS shapes, on CPU (see
    the module docstring): BLAS_ROUNDING_ULPS x eps(dtype) x max |reference|."""
    return BLAS_ROUNDING_ULPS * torch.finfo(reference.dtype).eps * reference.detach().abs().max().item()
