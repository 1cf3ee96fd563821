"""The training kernels' GPU-only tilings, forced onto CPU shapes with the
test-only knobs of backends/triton/_common.py (forced_tiling): several
tiles per group in a block of 2 groups (KCH >= 2, as d > 64 or
rk.models.resnext29(2, 128) get on a GPU), wgrad reductions split into 2
and 3 pixel ranges, and many statistics tiles (16-pixel tiles). Each case
runs a training step against the float64 torchvision block
(training_cases.run_steps), under counting_launches, and checks that the
forced configuration did run (a knob that stopped working would otherwise
pass silently on the normal tiling).

Under the interpreter a case without the knobs has one tile per group, one
pixel range per wgrad and one statistics tile per 128 pixels; these paths
are otherwise covered by the GPU tests only (issue 26: a wrong input-chunk
offset for a group spanning several tiles, and a split sum that drops its
last range, survived every CPU test before).
"""

import pytest
import torch
from training_cases import CASES, HAS_CUDA, TrainCase, needs_triton, run_steps

from resnext_kernels.backends.triton import _common

pytestmark = needs_triton

# d = 32 in 2 groups (width 64, identity): at max_gt 16 each group spans
# KCH = 2 tiles of 16 channels, 4 tiles in all.
TWO_WIDE_GROUPS = TrainCase(32, 8, 2, 256, 5, 4)
# 4 groups of 4 in one tile (width 16, identity), 2 x 5 x 4 = 40 pixels:
# three 16-pixel steps, so every wgrad can take 2 or 3 pixel ranges.
SMALL = TrainCase(16, 4, 4, 64, 5, 4)


def _launched(counts, kernel, **consts):
    """Launches of `kernel` whose constexprs include `consts`, per pixel-range count."""
    found = {}
    for (name, kconsts, ranges), k in counts.items():
        if name == kernel and all(dict(kconsts).get(c) == v for c, v in consts.items()):
            found[ranges] = found.get(ranges, 0) + k
    return found


def test_two_groups_spanning_two_tiles_each(allow_tf32):
    """2 groups of 32 channels at max_gt 16 (KCH = 2) in the grouped conv's
    forward, dgrad and wgrad: the input chunks of the second group start at
    packed channel 32, not 16."""
    allow_tf32(False)
    with _common.forced_tiling(max_gt=16), _common.counting_launches() as counts:
        run_steps(TWO_WIDE_GROUPS, torch.float32, steps=1)
    for kernel in ("grouped_conv_bn_stats", "grouped_conv_dgrad", "grouped_conv_wgrad"):
        assert _launched(counts, kernel, KCH=2, GT=16), kernel


@pytest.mark.skipif(HAS_CUDA, reason="forced_tiling(pixels=...) sets the interpreter's tiles; a GPU keeps its own")
@pytest.mark.parametrize("splits", [2, 3])
def test_split_wgrads_and_many_statistics_tiles(splits, allow_tf32):
    """Every wgrad (conv1, the grouped conv, conv3) split into `splits`
    pixel ranges of 16-pixel steps, summed in order; 16-pixel statistics
    and partial-sum tiles (3 per norm)."""
    allow_tf32(False)
    with _common.forced_tiling(wgrad_splits=splits, pixels=16), _common.counting_launches() as counts:
        run_steps(SMALL, torch.float32, steps=1)
    assert set(_launched(counts, "grouped_conv_wgrad")) == {splits}
    assert set(_launched(counts, "conv1x1_wgrad")) == {splits}
    for kernel in ("conv1x1_bn_stats", "conv1x1_dgrad", "bn_add_relu_backward"):
        assert _launched(counts, kernel, BLOCK_M=16), kernel
    assert _launched(counts, "grouped_conv_bn_stats", BLOCK_P=16)


@pytest.mark.parametrize("max_gt", [16, 32])
def test_one_group_wider_than_a_tile_sweeps_its_chunks(max_gt, allow_tf32):
    """d = 64 with GT forced to 16 or 32 (KCH = 4 or 2): the forward, dgrad
    and wgrad of the grouped conv must sweep all chunks of a group; a kernel
    reading only its own tile passes d <= 16 and fails here."""
    allow_tf32(False)
    case = next(c for c in CASES if c.d == 64)
    with _common.forced_tiling(max_gt=max_gt), _common.counting_launches() as counts:
        run_steps(case, torch.float32, steps=1)
    assert _launched(counts, "grouped_conv_wgrad", KCH=64 // max_gt)


def test_forced_tiling_is_scoped_and_checked():
    """The knobs apply within the context only, and reject a pixel tile
    tl.dot cannot take."""
    with _common.forced_tiling(pixels=32):
        assert _common.interpreter_pixels() == 32
        with _common.forced_tiling(max_gt=16):
            assert _common.FORCED.max_gt == 16 and _common.FORCED.pixels is None
        assert _common.interpreter_pixels() == 32
    assert _common.FORCED == _common.ForcedTiling()
    with pytest.raises(ValueError, match="pixels must be a power of two >= 16"):
        with _common.forced_tiling(pixels=24):
            pass
