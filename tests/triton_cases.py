"""Shared cases and helpers of the Triton backend tests (test_triton_*.py).

On a machine without CUDA the kernels run on CPU tensors in the Triton
interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton. The line below repeats that for a run of one file alone without the
conftest; it is a no-op when triton was already imported (then conftest did it).

Interpreter caveats: `tl.dot` ignores input_precision there (numpy fp32), so
the TF32 on/off runs on CPU check that both settings run and are correct but
cannot see a TF32 difference; bf16 dots give garbage in the interpreter, so
bf16 is tested on CUDA only. Sizes stay small (H, W <= 9) because the
interpreter runs every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402
from helpers import Block, assert_close_to_reference  # noqa: E402

from resnext_kernels.backends import registry  # noqa: E402
from resnext_kernels.backends.reference import bottleneck_inference_reference  # noqa: E402
from resnext_kernels.backends.triton import bottleneck_inference_triton  # noqa: E402
from resnext_kernels.bench import triton_compile as compile_check  # noqa: E402
from resnext_kernels.bench.shapes import BlockShape  # noqa: E402
from resnext_kernels.common import settings, tolerance  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # subprocesses import the package from here


DEVICE = "cuda" if HAS_CUDA else "cpu"


cuda_only = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)"))


needs_triton = pytest.mark.skipif(
    registry.unavailable_reason("triton", DEVICE) is not None,
    reason=f"triton backend unusable: {registry.unavailable_reason('triton', DEVICE)}",
)


# (dtype, allow_tf32): allow_tf32 is set for the fp32 runs only.
DTYPES = [
    pytest.param(torch.float32, True, id="fp32-tf32on"),
    pytest.param(torch.float32, False, id="fp32-tf32off"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.bfloat16, None, id="bf16", marks=cuda_only),  # interpreter bf16 dots are garbage
]


# Floor of the relative error bound (helpers.assert_close_to_reference): for
# fp32 with TF32 on, a GPU convolution may or may not use TF32 while our dots
# always do, so eager's error does not bound ours; TF32 keeps 10 mantissa bits.
_TF32_FLOOR = 5e-3


def _check_block(block, dtype, tf32, device, allow_tf32, poisoned=None, eager_device=None, nan_out=False,
                 strategy=None, batch_chunk=None):
    """Run the triton backend on `block` and compare with fp64 and eager at dtype.

    nan_out: pass a NaN-filled `out=` (else y comes from torch.empty).
    strategy, batch_chunk: the launcher's overrides (None: the backend chooses)."""
    if tf32 is not None:
        allow_tf32(tf32)
    inputs = block.make(dtype, device)
    expected = bottleneck_inference_reference(*_fp64_cpu(inputs), *block.conv)
    eager = bottleneck_inference_reference(*inputs, *block.conv)
    n_poisoned = len(poisoned) if poisoned is not None else 0
    ho, wo = (block.h - 1) // block.stride + 1, (block.w - 1) // block.stride + 1
    out = None
    if nan_out:
        out = torch.full((block.n, block.cout, ho, wo), float("nan"), dtype=dtype, device=device)
        out = out.contiguous(memory_format=torch.channels_last)
    y = bottleneck_inference_triton(*inputs, *block.conv, out=out, strategy=strategy, batch_chunk=batch_chunk)
    assert out is None or y is out
    if poisoned is not None:
        expected_empties = (1 if nan_out else 2) + (strategy == "split")
        assert len(poisoned) - n_poisoned >= expected_empties, \
            "t1 (t2 when split, y) should come from the poisoned torch.empty"
    assert y.shape == (block.n, block.cout, ho, wo)
    assert y.dtype == dtype and y.device == inputs[0].device
    assert y.is_contiguous(memory_format=torch.channels_last)
    floor = _TF32_FLOOR if (tf32 and device == "cuda") else 1e-6
    # On a GPU also the mean error (a rounding bias), where the output is
    # large enough for that rule (interpreter-sized blocks are not).
    mean_error = device == "cuda" and y.numel() >= tolerance.MIN_MEAN_ERROR_ELEMENTS
    assert_close_to_reference(y.cpu(), expected, eager.cpu(), floor=floor, mean_error=mean_error)


def _fp64_cpu(inputs):
    return [None if t is None else t.detach().to("cpu", torch.float64) for t in inputs]


def _meta_kernel_args(shape, dtype):
    """(tiling, K1 (args, consts), K2 (args, consts)) as the launchers build
    them for a compile_check.SHAPES-style `shape` at batch 128, on meta
    tensors (host logic only), with the current TF32 flag."""
    tiling, launches = compile_check.kernel_launches(shape, dtype, torch.backends.cudnn.allow_tf32)
    return tiling, launches["K1"][2:], launches["K2"][2:]


def _named(kernel, args, consts):
    """Kernel argument name -> value, as the autotuner hands them to the prune callback."""
    return {**dict(zip(kernel.arg_names, args)), **consts}


# (dtype, allow_tf32) of the three operand classes of the GPU config tables.
OPERAND_CLASSES = {
    "bf16": (torch.bfloat16, True),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}


def _launch_params(config):
    """A triton.Config as plain values (Config has no __eq__)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _k1_params(bm, bn, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def _k2_params(bp, bco, warps, stages):
    return {"BLOCK_P": bp, "BLOCK_CO": bco, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}


# The canonical shapes plus an interpreter-sized unaligned block (Cin 24,
# Cout 40) where no K1 tile fits and the prune falls back to its smallest.
HEURISTIC_SHAPES = {**compile_check.SHAPES, "tiny_odd": BlockShape("tiny_odd", 9, 24, 32, 8, 40, 1)}


# Launches per kernel of each strategy (K1's kernel runs twice when split: K1, K2b).
STRATEGY_LAUNCHES = {"fused": {"K1": 1, "K2": 1, "K2a": 0}, "split": {"K1": 2, "K2": 0, "K2a": 1}}


def _assert_heuristic_launches(records, strategy="fused"):
    """The kernels of `strategy` ran raw, once each, with the meta-parameters,
    num_warps and num_stages of the config heuristic_config picked; never
    autotuned. K1's kernel ran without RESIDUAL (K1), then with it (K2b)."""
    for name, rec in records.items():
        assert not rec["tuned"], f"{name} went through the autotuner with {settings.AUTOTUNE_ENV}=0"
        assert len(rec["picked"]) == len(rec["raw"]) == STRATEGY_LAUNCHES[strategy][name], name
        for picked, raw in zip(rec["picked"], rec["raw"]):
            params = _launch_params(picked)
            assert {k: raw.get(k) for k in params} == params, name
    assert [raw["RESIDUAL"] for raw in records["K1"]["raw"]] == [False, True][:STRATEGY_LAUNCHES[strategy]["K1"]]


# ---------------------------------------------------------------- GPU only
# Same regimes at realistic-ish sizes, plus the canonical ResNeXt-50 32x4d
# shapes (bench.shapes.SHAPES) at batch 2.
GPU_BLOCKS = [
    Block(4, 64, 128, 256, 32, 28, 28, projection=True),               # s1_first, 28x28
    Block(2, 256, 128, 256, 32, 56, 56),                               # s1
    Block(2, 256, 256, 512, 32, 56, 56, stride=2, projection=True),    # s2_first
    Block(2, 512, 256, 512, 32, 28, 28),                               # s2
    Block(2, 1024, 512, 1024, 32, 14, 14),                             # s3 (d=16)
    Block(2, 2048, 1024, 2048, 32, 7, 7),                              # s4 (d=32)
    Block(2, 256, 512, 256, 8, 32, 32),                                # cifar29 (d=64)
    Block(2, 200, 280, 328, 20, 13, 15, stride=2, projection=True),    # d=14, odd everything
    Block(1, 96, 384, 96, 3, 17, 17, dilation=2),                      # d=128, dilation 2
    Block(2, 72, 96, 72, 96, 13, 13),                                  # d=1
    Block(2, 120, 240, 136, 6, 11, 9, stride=2, projection=True),      # d=40
]


# ------------------------------------------------ split path (identity blocks)
# K1, K2a (t2 = relu(grouped 3x3 + b2) written once), K2b (K1's kernel with
# RESIDUAL: relu(t2 @ w3 + b3 + x)). Every packing regime: d = 1, 4, 14
# (dilation 2), 24 (d_p 32), 64, 128 (a group spans two 64-channel tiles,
# KCH = 2); unaligned channel counts; odd H/W; batch 2 so chunks of 1 reuse
# the t1/t2 buffers.
SPLIT_BLOCKS = [
    Block(2, 20, 16, 20, 16, 7, 7),               # d=1
    Block(2, 32, 64, 32, 16, 9, 9),               # d=4
    Block(2, 28, 28, 28, 2, 7, 9, dilation=2),    # d=14, dilation 2
    Block(2, 20, 48, 20, 2, 5, 7),                # d=24 -> d_p=32
    Block(2, 36, 128, 36, 2, 7, 7),               # d=64
    Block(2, 24, 256, 24, 2, 5, 5),               # d=128: KCH=2
]
