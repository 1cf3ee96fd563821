"""The one rule for "close to PyTorch", used by the tests and the benchmarks.

A fused result is compared with a float64 reference, and so is eager
PyTorch's own result at the same dtype. PyTorch's error sets the scale: the
fused result's max abs error may be at most FACTOR times eager's, plus a
floor of FLOOR times the reference's largest magnitude (for when eager
happens to be exact, e.g. a float64 run or a tiny case). Relative to the
reference's largest magnitude this is: rel_err <= FACTOR * eager_rel_err + FLOOR.
"""

FACTOR = 2.0
FLOOR = 1e-6


def error_bound(eager_error, scale, factor=FACTOR, floor=FLOOR):
    """The largest max-abs error vs the float64 reference a fused result may
    have, given eager PyTorch's max-abs error at the same dtype and
    scale = max |reference|."""
    return factor * eager_error + floor * scale
