"""The training kernels' fixed GPU configs, checked without a GPU: the
sm_90a compile of one training step (every distinct launch), the wgrad
split rule, and the launch recorder the compile check relies on."""

import json
import os
import subprocess
import sys

import pytest
import torch
from training_cases import needs_triton

from resnext_kernels.backends.triton import _common
from resnext_kernels.backends.triton.conv1x1_wgrad import (
    MIN_PIXELS_PER_SPLIT,
    gpu_splits,
)
from resnext_kernels.bench import triton_compile as compile_check
from resnext_kernels.common import settings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_MAX_SHARED = settings.H100_SMEM_OPTIN


def test_training_step_compiles_for_sm90_without_spills():
    """One bf16 training step (forward + backward) of the stride-2
    projection block s2_first at batch 128: every distinct launch compiles
    for sm_90a (Triton + the bundled ptxas, no GPU) with zero spill stores,
    shared memory within 227 KB, and tensor-core MMAs in every conv kernel.
    A subprocess, because the kernels must not be interpreted there."""
    cmd = [sys.executable, "-m", "resnext_kernels.bench.triton_compile", "--training", "--json", "s2_first"]
    res = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout)
    kernels = {r["kernel"].split("#")[0] for r in results}
    assert kernels == {"conv1x1_bn_stats", "finalize", "grouped_conv_bn_stats", "bn_add_relu", "restore",
                       "bn_add_relu_backward", "sum_rows", "coefficients", "conv1x1_dgrad", "conv1x1_wgrad",
                       "grouped_conv_dgrad", "grouped_conv_wgrad"}
    bad = [r for r in results if r["spill_stores"] or r["shared"] > SM90_MAX_SHARED
           or ("conv" in r["kernel"] and not r["tensor_cores"])]
    assert not bad, bad


def test_wgrad_split_rule():
    """Split the pixel reduction while the output tiles cannot fill the GPU,
    never below MIN_PIXELS_PER_SPLIT pixels a range, and only while the fp32
    partials stay small next to the kernel's reads."""
    # s1's conv1 wgrad (width 128 x Cin 256: 2 tiles, 401k pixels, small weight): many ranges
    m = 128 * 56 * 56
    assert gpu_splits(m, 2, 128 * 256 * 4, m * (256 + 2 * 128) * 2) > 16
    # s4's conv3 wgrad (2048 x 1024 fp32 partials of 8 MB, 6272 pixels): one range
    m4 = 128 * 7 * 7
    assert gpu_splits(m4, 128, 2048 * 1024 * 4, m4 * (1024 + 2 * 2048) * 2) == 1
    # never shorter than MIN_PIXELS_PER_SPLIT
    assert gpu_splits(3 * MIN_PIXELS_PER_SPLIT, 1, 4, 10**12) == 3


@needs_triton
def test_launch_recorder_records_instead_of_launching():
    """recording_launches() collects the launches of a training step built on
    meta tensors (nothing runs) and restores normal launching afterwards."""
    launches = compile_check.training_launches(compile_check.SHAPES["s1"], torch.bfloat16, batch=2)
    assert "conv1x1_bn_stats" in launches and "grouped_conv_wgrad" in launches
    assert _common._RECORDED is None
    with _common.recording_launches() as outer:
        with _common.recording_launches() as inner:
            _common.launch_fixed(None, (1,), (), {}, 4, 1)
        assert inner and not outer
    assert _common._RECORDED is None
    with pytest.raises(TypeError):  # launching for real again: None is not a kernel
        _common.launch_fixed(None, (1,), (), {}, 4, 1)
