"""What the training benchmark times (benchmarks/test_training_bench.py):
one training step (forward, then backward of <out, grad>) of a block or of
torchvision's resnext50_32x4d, bf16 autocast, channels_last, on a GPU.

Implementations: "eager_amp" (torchvision's module, fp32 parameters, under
torch.autocast(bfloat16)), "compile_amp" (the same through
torch.compile(mode=COMPILE_MODE)), "triton" (FusedResNeXtBlock / convert
with backend="triton": the fused training kernels, same parameters and
autocast). Every implementation starts from the same module and input.
"""

import copy
import time

import torch

from ..backends import registry
from ..block import FusedResNeXtBlock
from ..common.timing import round_seconds, synchronize
from ..convert import convert
from .measure import RotatingTarget, plan_rounds

TRAIN_IMPLS = ("eager_amp", "triton", "compile_amp")
TRAIN_DTYPE = torch.bfloat16
# Inductor's default mode: max-autotune compiles a training graph (forward
# and backward) for minutes per shape, which the GPU check cannot afford.
COMPILE_MODE = "default"


def train_impl_unavailable_reason(impl, device):
    """None if `impl` can be benchmarked on `device`, else why not."""
    if impl not in TRAIN_IMPLS:
        raise ValueError(f"training impl {impl!r} is not one of {TRAIN_IMPLS}")
    if device.type != "cuda":
        return ("the training benchmark runs on CUDA only (bf16 autocast at batch 128; on CPU the triton path "
                "runs in the interpreter)")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if impl == "triton":
        reason = registry.training_unavailable_reason("triton", device)
        if reason is not None:
            return f"backend 'triton' cannot train here: {reason}"
    return None


def build_training_step(impl, module, device, x, grad, is_model=False):
    """(step, info): step(x) runs one training step of `impl` on a copy of
    `module` (a torchvision block or model, fp32 parameters), gradients set
    to None first; the first call runs here (compiles, tunes); info records
    its seconds and the first output for comparison."""
    module = copy.deepcopy(module).train()
    if impl == "triton":
        module = convert(module, backend="triton") if is_model else FusedResNeXtBlock.from_bottleneck(
            module, backend="triton")
    module = module.to(device=device, memory_format=torch.channels_last)
    forward = torch.compile(module, mode=COMPILE_MODE) if impl == "compile_amp" else module
    params = list(module.parameters())
    outputs = []

    def step(inp):
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=TRAIN_DTYPE):
            y = forward(inp)
        y.backward(grad)
        return y

    t0 = time.perf_counter()
    outputs.append(step(x).detach())
    synchronize(device)
    return step, {"first_call_s": time.perf_counter() - t0, "output": outputs[0]}


__all__ = ["COMPILE_MODE", "TRAIN_DTYPE", "TRAIN_IMPLS", "build_training_step", "train_impl_unavailable_reason"]


def time_step(benchmark, step, x, device, seconds):
    """Time step(x) with pytest-benchmark's `benchmark` for about `seconds`:
    rounds planned from one calibration round, inputs rotated."""
    calib = round_seconds(step, [x], device, 1)[0]
    benchmark.pedantic(RotatingTarget(step, [x], device), iterations=1, warmup_rounds=1,
                       rounds=plan_rounds(calib, seconds))


def peak_step_bytes(step, x, device):
    """Peak CUDA memory allocated during one step(x)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(x)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
