"""One small block per kernel family, for compute-sanitizer memcheck (the GPU
check's sanitizer stage, scripts/gpu_check.sh).

    compute-sanitizer --tool memcheck python scripts/gpu_sanitizer_cases.py [--families a,b]

Families (FAMILIES): the CUDA inference kernel; the Triton inference kernels
on the fused path (K1, K2) and on the split path (K1, K2a, K2b); the Triton
training kernels, one forward + backward step; and the fine-tuning backward,
forward + backward through the inference op with frozen (eval-mode)
BatchNorm (ATen's backward today; issue 22's fused backward when it lands,
with no change here). Odd channel counts, a projection shortcut, stride 2 and
dilation 2 where the family takes them, so masked edges and the shortcut's
strided loads are exercised. Autotuning is off (one config per kernel: the
sanitizer checks memory accesses, and timing under it means nothing).
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the check does), so that every
tensor is its own allocation and memcheck sees its bounds rather than those
of a pooled segment. The Triton inference outputs are NaN-filled first
(out=), and every output and gradient must come out finite; correctness
against float64 is the sweep's job (tests/test_gpu_sweep.py). Exits 1 on a
failed check; compute-sanitizer's own exit code reports memory errors.
"""

import argparse
import copy
import os
import sys

os.environ.setdefault("RESNEXT_KERNELS_AUTOTUNE", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.resnet import Bottleneck  # noqa: E402

from resnext_kernels import FusedResNeXtBlock  # noqa: E402
from resnext_kernels.backends.triton import bottleneck_inference_triton  # noqa: E402
from resnext_kernels.ops.inference import bottleneck_inference  # noqa: E402

DEVICE = "cuda"


def _block_args(n, cin, width, cout, groups, hw, projection, dtype):
    """[x, w1, b1, w2, b2, w3, b3, wd, bd]: fresh random inputs on the GPU."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)

    d = width // groups
    args = [rnd(n, cin, hw, hw).contiguous(memory_format=torch.channels_last),
            rnd(width, cin, 1, 1, scale=cin ** -0.5), rnd(width, scale=0.3), rnd(width, d, 3, 3, scale=(9 * d) ** -0.5),
            rnd(width, scale=0.3), rnd(cout, width, 1, 1, scale=width ** -0.5), rnd(cout, scale=0.3)]
    args += [rnd(cout, cin, 1, 1, scale=cin ** -0.5), rnd(cout, scale=0.3)] if projection else [None, None]
    return args


def _poisoned_out(n, cout, ho, dtype):
    return torch.full((n, cout, ho, ho), float("nan"), device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last)


def _finite(name, *tensors):
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            raise AssertionError(f"{name}: non-finite values (unwritten or out-of-range elements)")


def cuda_inference():
    # Cin 40, width 48 (3 groups of d = 16), Cout 72, 11x11, stride 2, projection.
    args = _block_args(2, 40, 48, 72, 3, 11, True, torch.bfloat16)
    y = bottleneck_inference(*args, stride=2, dilation=1, groups=3, backend="cuda")
    _finite("cuda inference", y)


def triton_fused():
    # Cin 40 (unaligned rows), width 32 (8 groups of d = 4: packed tiles), Cout 72, stride 2, projection.
    args = _block_args(2, 40, 32, 72, 8, 11, True, torch.bfloat16)
    y = bottleneck_inference_triton(*args, 2, 1, 8, out=_poisoned_out(2, 72, 6, torch.bfloat16), strategy="fused")
    _finite("triton fused", y)


def triton_split():
    # Identity shortcut (the split path's K2b adds it), dilation 2, d = 8.
    args = _block_args(2, 48, 64, 48, 8, 9, False, torch.float16)
    y = bottleneck_inference_triton(*args, 1, 2, 8, out=_poisoned_out(2, 48, 9, torch.float16), strategy="split")
    _finite("triton split", y)


def _torchvision_block(inplanes, planes, groups, base_width, stride, dilation):
    downsample = None
    if stride != 1 or inplanes != 4 * planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(4 * planes))
    block = Bottleneck(inplanes, planes, stride, downsample, groups, base_width, dilation)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return block


def _step(block, inplanes, hw, dtype):
    x = torch.randn(2, inplanes, hw, hw, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = block(x)
    y.backward(torch.randn_like(y))
    return y, x.grad, [p.grad for p in block.parameters()]


def triton_training():
    # 40 -> planes 12 (width 24: 2 groups of d = 12, padded to 16) -> 48, stride 2, projection, batch statistics.
    tv = _torchvision_block(40, 12, 2, 64, 2, 1)
    block = FusedResNeXtBlock.from_bottleneck(tv, backend="triton").to(DEVICE, torch.bfloat16).train()
    y, gx, grads = _step(block, 40, 9, torch.bfloat16)
    _finite("triton training", y, gx, *grads)


def finetune_backward():
    # Frozen BatchNorm (eval mode): the inference op, forward and backward.
    tv = _torchvision_block(40, 12, 2, 64, 2, 2)
    block = FusedResNeXtBlock.from_bottleneck(copy.deepcopy(tv), backend="triton").to(DEVICE, torch.bfloat16).eval()
    y, gx, grads = _step(block, 40, 9, torch.bfloat16)
    _finite("fine-tuning backward", y, gx, *grads)


FAMILIES = {f.__name__: f for f in (cuda_inference, triton_fused, triton_split, triton_training,
                                      finetune_backward)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, some of {','.join(FAMILIES)} (default: all)")
    opts = parser.parse_args(argv)
    names = opts.families.split(",")
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if not torch.cuda.is_available():
        print("gpu_sanitizer_cases.py needs a CUDA device", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        torch.manual_seed(len(name))
        try:
            FAMILIES[name]()
            torch.cuda.synchronize()
            print(f"{name}: ok", flush=True)
        except Exception as exc:  # report every family, then fail
            failed = 1
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
