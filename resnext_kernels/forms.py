"""The ResNeXt paper's three equivalent forms of the block (Xie et al. 2017, Fig. 3).

  (a) ``BranchBlock``: C parallel branches 1x1(Cin->d) -> 3x3(d->d) -> 1x1(d->Cout),
      summed, then bn3, + shortcut, ReLU.
  (b) ``ConcatBlock``: C branches 1x1(Cin->d) -> 3x3(d->d), concatenated, one
      1x1(C*d->Cout), bn3, + shortcut, ReLU.
  (c) the grouped conv: torchvision's Bottleneck, i.e. ``FusedResNeXtBlock``
      (whose train-mode forward is exactly torchvision's math).

BN is "appropriately addressed" as in the paper: bn1/bn2 are per channel, so
each branch owns the BN of its own d channels (the slice of the grouped
block's BN); bn3 normalizes the sum of the branches (form a) or the single
conv3 output (form b), which is the same tensor. The converters below are
exact (parameters and buffers are sliced or concatenated, nothing refit), so
the three forms give identical outputs, gradients and running-stat updates.
"""

import copy

import torch
from torch import nn

from .block import FusedResNeXtBlock


def _bn_like(bn, channels):
    new = nn.BatchNorm2d(channels, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    return new.to(device=bn.weight.device if bn.affine else bn.running_mean.device,
                  dtype=(bn.weight if bn.affine else bn.running_mean).dtype)


def _slice_bn(bn, start, stop):
    """nn.BatchNorm2d over channels [start, stop) of `bn`."""
    new = _bn_like(bn, stop - start)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(new, name).copy_(src[start:stop])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _concat_bns(bns):
    """One nn.BatchNorm2d whose channels are the concatenation of `bns`."""
    first = bns[0]
    new = _bn_like(first, sum(b.num_features for b in bns))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(first, name) is not None:
                getattr(new, name).copy_(torch.cat([getattr(b, name) for b in bns]))
        if first.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(first.num_batches_tracked)
    new.train(first.training)
    return new


def _conv_from(weight, stride=1, padding=0, dilation=1, groups=1):
    out_ch, in_per_group, k, _ = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_ch, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=False)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


class _Branch(nn.Module):
    """One path: 1x1(Cin->d) -> BN -> ReLU -> 3x3(d->d) -> BN -> ReLU [-> 1x1(d->Cout)]."""

    def __init__(self, conv1, bn1, conv2, bn2, conv3=None):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.conv3 = conv3
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return out if self.conv3 is None else self.conv3(out)


class _MultiPathBlock(nn.Module):
    def __init__(self, branches, conv3, bn3, downsample):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.conv3 = conv3  # form (b) only
        self.bn3 = bn3
        self.downsample = downsample
        self.relu = nn.ReLU()

    @property
    def cardinality(self):
        return len(self.branches)

    def _transform(self, x):
        raise NotImplementedError

    def forward(self, x):
        out = self.bn3(self._transform(x))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BranchBlock(_MultiPathBlock):
    """Form (a): C branches each ending in its own 1x1(d->Cout), summed."""

    def _transform(self, x):
        return sum(branch(x) for branch in self.branches)


class ConcatBlock(_MultiPathBlock):
    """Form (b): C branches concatenated, then one 1x1(C*d->Cout)."""

    def _transform(self, x):
        return self.conv3(torch.cat([branch(x) for branch in self.branches], dim=1))


def _branches_from_grouped(block, with_conv3):
    c2 = block.conv2
    groups, d = c2.groups, c2.out_channels // c2.groups
    if c2.in_channels != c2.out_channels:
        raise ValueError("conv2 must map width to width")
    if type(block.bn1) is not nn.BatchNorm2d or type(block.bn2) is not nn.BatchNorm2d:
        raise ValueError("forms (a)/(b) are built for nn.BatchNorm2d blocks")
    branches = []
    for g in range(groups):
        lo, hi = g * d, (g + 1) * d
        branches.append(_Branch(
            _conv_from(block.conv1.weight[lo:hi]),
            _slice_bn(block.bn1, lo, hi),
            _conv_from(c2.weight[lo:hi], stride=c2.stride[0], padding=c2.padding[0], dilation=c2.dilation[0]),
            _slice_bn(block.bn2, lo, hi),
            _conv_from(block.conv3.weight[:, lo:hi]) if with_conv3 else None,
        ))
    return branches


def grouped_to_branches(block):
    """Form (c) -> form (a), exact."""
    return BranchBlock(_branches_from_grouped(block, True), None, copy.deepcopy(block.bn3),
                       copy.deepcopy(block.downsample)).train(block.training)


def grouped_to_concat(block):
    """Form (c) -> form (b), exact."""
    return ConcatBlock(_branches_from_grouped(block, False), copy.deepcopy(block.conv3), copy.deepcopy(block.bn3),
                       copy.deepcopy(block.downsample)).train(block.training)


def multipath_to_grouped(block, backend="auto"):
    """Form (a) or (b) -> form (c) as a FusedResNeXtBlock, exact."""
    if not isinstance(block, _MultiPathBlock):
        raise TypeError(f"block must be a BranchBlock or ConcatBlock, got {type(block).__name__}")
    br = block.branches
    c2 = br[0].conv2
    w1 = torch.cat([b.conv1.weight for b in br])
    w2 = torch.cat([b.conv2.weight for b in br])
    if isinstance(block, BranchBlock):
        w3 = torch.cat([b.conv3.weight for b in br], dim=1)
    else:
        w3 = block.conv3.weight
    return FusedResNeXtBlock.from_modules(
        _conv_from(w1),
        _concat_bns([b.bn1 for b in br]),
        _conv_from(w2, stride=c2.stride[0], padding=c2.padding[0], dilation=c2.dilation[0], groups=len(br)),
        _concat_bns([b.bn2 for b in br]),
        _conv_from(w3),
        copy.deepcopy(block.bn3),
        copy.deepcopy(block.downsample),
        backend=backend,
        training=block.training,
    )
