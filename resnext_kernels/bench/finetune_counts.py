"""Counts of the fine-tuning path (frozen BatchNorm: the inference op's
forward and fused backward) that need no GPU (docs/training.md,
"Fine-tuning with frozen BatchNorm"):

    python -m resnext_kernels.bench.finetune_counts [--batch 128] [--saved-batch 2] [--resolution 224]

prints (1) the derived HBM bytes of one forward + backward step with
eval-mode BatchNorm of every canonical shape, fused vs eager
(finetune_step_bytes; bf16), and (2) the activation bytes autograd saves
for backward during one forward of torchvision's resnext50_32x4d's 16
blocks with FrozenBatchNorm2d and with eval-mode BatchNorm2d, eager vs
converted (measured on CPU; the converted model runs the inference op on
the reference backend: what it saves is the op's choice, x, the folded
weights and y, the same on every backend).
"""

import argparse
import copy
import sys

import torch

from ..backends.triton.packing import GroupTiling
from ..convert import convert
from .measure import saved_activation_bytes
from .shapes import _conv1x1_wgrad_bytes, _training_maps, _wgrad_output_bytes, gpu_splits, step_bytes_table

# Pixels per row of fp64 partial sums the fused backward writes (and
# sum_rows reads back), per kernel, on a GPU with 16-bit operands: the tail
# (bn_add_relu._tiles(backward=True): 32), conv3's dgrad
# (_common.training_gemm_tiles: 128), the grouped dgrad
# (grouped_conv_bn_stats.block_p: 128, 64 for wide tiles or stride 2).
TAIL_ROW_PIXELS = 32
DGRAD_ROW_PIXELS = 128


def finetune_step_traffic(shape, batch):
    """The kernels of one fine-tuning step (forward + backward, BatchNorm
    with fixed statistics and trainable affine parameters) of a block and
    the activation-map elements each reads and writes, assuming each kernel
    reads its inputs once from DRAM (as bench.shapes.training_step_traffic;
    a fused prologue that reads dz as both BN-backward operands reads the
    same addresses, counted once).

    "fused": the inference op's triton forward (K1, K2) and the fused
    backward, which recomputes t1 and t2 (K1, K2a) from x. "eager": eager
    PyTorch with eval-mode BatchNorm2d: each norm reads and writes its map
    once in forward and, in backward, reads its gradient and input (the
    affine parameters' reduction) and its gradient again (the input
    gradient), writing once; in-place ReLUs; the residual add; the x
    gradients' accumulation. (FrozenBatchNorm2d moves the same map bytes in
    total: a mul and an add in forward, one mul in backward.)
    """
    m = _training_maps(shape, batch)
    x, y1, y2, y3, xs = m["x"], m["y1"], m["y2"], m["y3"], m["xs"]
    proj = shape.projection
    short = xs if proj else x  # what K2's epilogue reads for the shortcut
    fused = [
        ("K1 conv1 + b1 + relu", x, y1), ("K2 gconv + conv3 + shortcut + relu", y1 + short, y3),
        ("recompute t1 (K1)", x, y1), ("recompute t2 (K2a)", y1, y2),
        ("tail: dz3 = relu backward, b3 sums", 2 * y3, y3),
        ("conv3 dgrad + relu2 mask + b2 sums", y3 + y2, y2), ("conv3 wgrad", y3 + y2, 0),
        *([("projection wgrad", y3 + xs, 0)] if proj else []),
        ("gconv dgrad + relu1 mask + b1 sums", y2 + y1, y1), ("gconv wgrad", y1 + y2, 0),
        ("conv1 dgrad + shortcut", y1 + y3, x), ("conv1 wgrad", x + y1, 0),
    ]
    yd = y3 if proj else 0
    eager = [
        ("conv1", x, y1), ("bn1", y1, y1), ("relu1", y1, y1), ("conv2", y1, y2), ("bn2", y2, y2),
        ("relu2", y2, y2), ("conv3", y2, y3), ("bn3", y3, y3),
        *([("downsample conv", xs, y3), ("downsample bn", y3, y3)] if proj else []),
        ("add", y3 + (yd if proj else x), y3), ("relu3", y3, y3),
        ("relu3 backward", 2 * y3, y3), ("bn3 backward", 3 * y3, y3), ("conv3 dgrad", y3, y2),
        ("conv3 wgrad", y3 + y2, 0),
        *([("downsample bn backward", 3 * y3, y3), ("downsample dgrad", y3, x), ("downsample wgrad", y3 + xs, 0)]
          if proj else []),
        ("relu2 backward", 2 * y2, y2), ("bn2 backward", 3 * y2, y2), ("conv2 dgrad", y2, y1),
        ("conv2 wgrad", y2 + y1, 0), ("relu1 backward", 2 * y1, y1), ("bn1 backward", 3 * y1, y1),
        ("conv1 dgrad", y1, x), ("conv1 wgrad", y1 + x, 0), ("x grad accumulation", 2 * x, x),
    ]
    return {"fused": fused, "eager": eager}


def finetune_step_bytes(shape, batch, dtype=torch.bfloat16):
    """HBM bytes of one fine-tuning step of a block, {"fused", "eager", "ratio"}.

    Activation maps in `dtype` (finetune_step_traffic). Weights in `dtype`:
    eager reads each conv weight in forward and dgrad and writes its
    gradient; the fused path reads the packed weights in forward, w1 and w2
    again in the recompute, each weight in its dgrad, writes what its
    wgrads write (bench.shapes._wgrad_output_bytes), and pays the BN fold
    each step (the weights change): read w, write w' in forward; in
    backward read dw' and w, write dw (the BN weights' reductions ride on
    the same reads). Its fp64 partial-sum rows (the bias gradients: 2 rows
    per TAIL_ROW_PIXELS of the tail, per DGRAD_ROW_PIXELS of each dgrad
    with a mask epilogue) are each written and read once. Eager's
    per-channel vectors are left out.
    """
    e = torch.empty((), dtype=dtype).element_size()
    traffic = finetune_step_traffic(shape, batch)
    maps = {k: sum(r + w for _, r, w in v) * e for k, v in traffic.items()}
    m = _training_maps(shape, batch)
    p_in, p_out = m["p_in"], m["p_out"]
    w_conv1, w_conv3 = shape.width * shape.cin, shape.cout * shape.width
    w_conv2 = shape.width * shape.group_width * 9
    w_proj = shape.cout * shape.cin if shape.projection else 0
    weights = w_conv1 + w_conv2 + w_conv3 + w_proj
    t = GroupTiling(shape.width, shape.groups)
    packed = 9 * t.width_p * t.gt
    gconv_splits = gpu_splits(p_out, 9 * t.n_tiles * t.kch, packed * 4, 3 * p_out * shape.width * e)
    fused_wgrads = (_conv1x1_wgrad_bytes(p_in, shape.width, shape.cin, e)
                    + _conv1x1_wgrad_bytes(p_out, shape.cout, shape.width, e)
                    + _wgrad_output_bytes(gconv_splits, w_conv2, packed, e)
                    + (_conv1x1_wgrad_bytes(p_out, shape.cout, shape.cin, e) if shape.projection else 0))
    fold = 2 * weights * e + 3 * weights * e
    fused_weights = weights * e + (w_conv1 + w_conv2) * e + weights * e + fused_wgrads + fold
    sums = 2 * 2 * (p_out / TAIL_ROW_PIXELS * shape.cout + p_out / DGRAD_ROW_PIXELS * shape.width
                    + p_in / DGRAD_ROW_PIXELS * shape.width)
    fused = maps["fused"] + fused_weights + sums * 8
    eager = maps["eager"] + 3 * weights * e
    return {"fused": fused, "eager": eager, "ratio": fused / eager}


def finetune_bytes_table(batch=128, dtype=torch.bfloat16):
    """Markdown table of finetune_step_bytes for every canonical shape (docs/training.md)."""
    return step_bytes_table(finetune_step_bytes, finetune_step_traffic, batch, dtype)


def _is_activation(batch):
    """Saved tensors that are activations: 4-D with the batch's images (the
    converted blocks also save their folded weights, which the fold cache
    holds anyway and which are not per-image)."""
    return lambda t: t.dim() == 4 and t.shape[0] == batch


def resnext50_block_saved_bytes(norm, resolution=224, batch=2, seed=0):
    """(eager, fused) activation bytes saved by the 16 blocks of
    resnext50_32x4d (layer1..layer4, on the stem's output) with norms
    `norm` ("frozen": torchvision's FrozenBatchNorm2d; "eval": BatchNorm2d
    in eval mode), fp32 on CPU, every parameter trainable."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    kwargs = {"norm_layer": FrozenBatchNorm2d} if norm == "frozen" else {}
    eager = torchvision.models.resnext50_32x4d(**kwargs).eval()
    fused = convert(copy.deepcopy(eager), backend="reference").eval()
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    counts = []
    for model in (eager, fused):
        with torch.no_grad():
            stem_out = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        blocks = torch.nn.Sequential(model.layer1, model.layer2, model.layer3, model.layer4)
        counts.append(saved_activation_bytes(blocks, stem_out.requires_grad_(True), include=_is_activation(batch))[0])
    return tuple(counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="batch of the HBM byte table")
    parser.add_argument("--saved-batch", type=int, default=2, help="batch of the saved-bytes measurement")
    parser.add_argument("--resolution", type=int, default=224)
    opts = parser.parse_args(argv)
    print(f"HBM bytes per fine-tuning step (eval-mode BN, forward + backward), batch {opts.batch}, bf16, "
          "derived:\n")
    print(finetune_bytes_table(opts.batch))
    print(f"\nsaved activation bytes, resnext50_32x4d's 16 blocks, one forward, fp32, batch {opts.saved_batch}, "
          f"{opts.resolution}x{opts.resolution}, measured on CPU:\n")
    print("| norms | eager MiB | fused MiB | fused / eager |\n|---|---|---|---|")
    for norm, label in (("frozen", "FrozenBatchNorm2d"), ("eval", "BatchNorm2d, eval mode")):
        e, f = resnext50_block_saved_bytes(norm, opts.resolution, opts.saved_batch)
        print(f"| {label} | {e / 2**20:.2f} | {f / 2**20:.2f} | {f / e:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
