"""Host time of the inner-hook check (resnext_kernels/inner_hooks.py) on
the hook-free path, CPU, one thread: the check alone (its remembered clean
scan, and a full scan), and a whole eval forward of a tiny block with a
no-op kernel (the host path only) with the check and with it stubbed out,
interleaved. Prints min and median per call.

    python scripts/hook_check_cost.py
"""

import statistics
import timeit

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

import resnext_kernels as rk
from resnext_kernels import inner_hooks
from resnext_kernels.backends import registry

torch.set_num_threads(1)


def best_and_median(fn, number, rounds):
    per = [t / number * 1e6 for t in timeit.Timer(fn).repeat(rounds, number)]
    return min(per), statistics.median(per)


down = nn.Sequential(nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
for name, tv in (("identity", Bottleneck(16, 4, groups=2)), ("projection", Bottleneck(16, 4, 2, down, groups=2))):
    b = rk.FusedResNeXtBlock.from_bottleneck(tv.eval(), backend="reference").eval()
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = b(x)
    cached = best_and_median(lambda: inner_hooks.hooked_submodule(b), 20000, 15)
    scan = best_and_median(lambda: inner_hooks._find(b._modules, ""), 20000, 15)
    real_check, real_kernel = inner_hooks.hooked_submodule, registry.kernel
    registry.kernel = lambda backend: (lambda *args: y)   # no-op kernel: the host path only
    res = {"check": [], "no check": []}
    with torch.no_grad():
        for _ in range(20):
            for k in res:
                inner_hooks.hooked_submodule = real_check if k == "check" else (lambda blk: None)
                res[k].append(min(timeit.Timer(lambda: b(x)).repeat(3, 500)) / 500 * 1e6)
    inner_hooks.hooked_submodule, registry.kernel = real_check, real_kernel
    print(f"{name}: hooked_submodule (clean, remembered) min {cached[0]:.2f} / median {cached[1]:.2f} us; "
          f"full scan min {scan[0]:.2f} / median {scan[1]:.2f} us; eval forward, no-op kernel: "
          f"with the check min {min(res['check']):.1f} / median {statistics.median(res['check']):.1f} us, "
          f"check stubbed out min {min(res['no check']):.1f} / median {statistics.median(res['no check']):.1f} us")
