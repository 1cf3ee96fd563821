"""Counts of the fused training path that need no GPU (docs/training.md):

    python -m resnext_kernels.bench.training_counts [--resolution 224] [--batch 1]

prints (1) the derived HBM bytes per training step (forward + backward) of
every canonical shape, fused vs eager (shapes.training_bytes_table, batch 128,
bf16), and (2) the activation bytes autograd saves for backward during one
train-mode forward of torchvision's resnext50_32x4d, eager vs converted
(measure.saved_activation_bytes), for the whole model and for its 16
blocks alone (layer1..layer4 on the stem's output). The converted model runs
the training op on the reference backend on CPU: what is saved is the op's
choice (x, y1, y2, y3, yd, out, mean/invstd), the same on every backend.
"""

import argparse
import copy
import sys

import torch

from ..convert import convert
from .measure import saved_activation_bytes
from .shapes import training_bytes_table


def resnext50_saved_bytes(resolution=224, batch=1, seed=0):
    """{"model": (eager, fused), "blocks": (eager, fused)} saved bytes (fp32, CPU, train mode)."""
    import torchvision

    torch.manual_seed(seed)
    eager = torchvision.models.resnext50_32x4d().train()
    fused = convert(copy.deepcopy(eager), backend="reference").train()
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    counts = {"model": [], "blocks": []}
    for model in (eager, fused):
        counts["model"].append(saved_activation_bytes(model, x)[0])
        with torch.no_grad():
            stem_out = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        blocks = torch.nn.Sequential(model.layer1, model.layer2, model.layer3, model.layer4)
        counts["blocks"].append(saved_activation_bytes(blocks, stem_out.requires_grad_(True))[0])
    return {k: tuple(v) for k, v in counts.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    opts = parser.parse_args(argv)
    print("HBM bytes per training step (forward + backward), batch 128, bf16, derived:\n")
    print(training_bytes_table())
    counts = resnext50_saved_bytes(opts.resolution, opts.batch)
    print(f"\nsaved activation bytes, resnext50_32x4d train-mode forward, fp32, batch {opts.batch}, "
          f"{opts.resolution}x{opts.resolution}, measured on CPU:\n")
    print("| scope | eager MiB | fused MiB | fused / eager |\n|---|---|---|---|")
    for scope, (e, f) in counts.items():
        print(f"| {scope} | {e / 2**20:.2f} | {f / 2**20:.2f} | {f / e:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
