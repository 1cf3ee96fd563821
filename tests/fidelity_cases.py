"""Shared pieces of the drop-in fidelity tests (test_fidelity_*.py): the
backends usable on CPU as pytest params, and torchvision Bottleneck / fused
block twins with identical random weights.

Like triton_cases.py, this sets TRITON_INTERPRET=1 before triton is imported
when no GPU is visible (a no-op when conftest already did).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest  # noqa: E402
from helpers import randomize_norms  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402

from resnext_kernels import FusedResNeXtBlock  # noqa: E402
from resnext_kernels.backends import registry  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

def cpu_backends():
    """pytest params of every backend usable on CPU: reference, triton (in
    the interpreter) and cuda_emulated; one that cannot run here is skipped
    with the reason."""
    params = []
    for name in ("reference", "triton", "cuda_emulated"):
        reason = registry.unavailable_reason(name, "cpu")
        marks = [pytest.mark.skipif(reason is not None, reason=f"backend {name!r} unusable here: {reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def cpu_backend_modes():
    """pytest params (backend, train) of every CPU backend in eval mode and
    of the training backends (all but cuda_emulated, which has no training
    kernels) in train mode; ids eval-<backend>, train-<backend>."""
    params = []
    for train in (False, True):
        for p in cpu_backends():
            if not (train and p.values[0] == "cuda_emulated"):
                params.append(pytest.param(p.values[0], train, marks=p.marks,
                                           id=f"{'train' if train else 'eval'}-{p.id}"))
    return params


def gpu_backends():
    """pytest params of the backends on CUDA tensors (marked cuda: skipped without a GPU)."""
    return [pytest.param(name, marks=(pytest.mark.cuda,), id=f"gpu-{name}")
            for name in ("reference", "triton", "cuda", "auto")]


# (inplanes, planes, stride, groups, base_width): an identity block whose
# packed grouped-conv tile holds four groups (d = 4), and a stride-2
# projection block with d = 3 (groups padded to 4 channels in the Triton
# packing). Both tiny: the Triton cases run in the interpreter.
IDENTITY_D4 = (32, 8, 1, 4, 32)
PROJECTION_D3 = (24, 8, 2, 4, 24)
BLOCKS = {"identity_d4": IDENTITY_D4, "projection_d3": PROJECTION_D3}


def torchvision_block(inplanes, planes, stride, groups, base_width, dtype=torch.float32):
    """A torchvision Bottleneck in eval mode with random weights and BN
    statistics (projection shortcut where the shape needs one), in `dtype`."""
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    return randomize_norms(Bottleneck(inplanes, planes, stride, downsample, groups, base_width)).eval().to(dtype)


def twin_blocks(cfg, backend, dtype=torch.float32):
    """(torchvision Bottleneck, FusedResNeXtBlock on `backend` with a copy of its weights), eval mode."""
    tv = torchvision_block(*cfg, dtype=dtype)
    return tv, FusedResNeXtBlock.from_bottleneck(tv, backend=backend).eval()


def tiny_resnext():
    """Issue 21's model: torchvision's ResNeXt with one Bottleneck per stage
    and 4 groups of width 4 (channels up to 2048: for the reference backend,
    too slow for the interpreter), random weights and BN statistics."""
    return randomize_norms(ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10))


def block_input(inplanes, n=2, hw=(7, 7), dtype=torch.float32, channels_last=True):
    x = torch.randn(n, inplanes, *hw, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops; on a busy 2-core machine torch's
    intra-op thread pool mostly waits for its second thread (0.26 s for a
    fp32 forward + backward of a tiny block, 1.2 ms of CPU). One thread for
    their duration, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
