"""Model builders: ResNeXt networks made of FusedResNeXtBlock.

ImageNet models (torchvision's ResNet, its Bottleneck blocks swapped for
fused ones; torchvision's builders do the rest, so ``weights=`` takes
torchvision's weight enums, loads strictly and downloads exactly as
torchvision does):

    resnext50_32x4d(weights=None, progress=True, backend="auto", **kwargs)
    resnext101_32x8d(...)
    resnext101_64x4d(...)

CIFAR models of the paper (Xie et al., CVPR 2017, sec. 5.1): a 3x3 stem of
64 channels, three stages of three bottleneck blocks with outputs 256, 512
and 1024 channels, the grouped conv's width C x d doubling per stage (d = 64
in stage 1), stride 2 at the first block of stages 2 and 3, global average
pooling and a linear classifier:

    resnext29_8x64d(num_classes=10, backend="auto", **kwargs)    # 34.4M parameters
    resnext29_16x64d(num_classes=10, backend="auto", **kwargs)   # 68.2M (the paper says 68.1M)
    resnext29(cardinality, width_per_group, ...)                 # small variants

Every model converts back to plain torchvision modules with
``resnext_kernels.unconvert(model)`` (Bottleneck blocks, same parameters and
state_dict keys), so a checkpoint trained here loads anywhere.
"""

from torch import nn
from torchvision.models import resnet as tv_resnet

from .block import FusedResNeXtBlock
from .common.validation import check_positive_int
from .convert import convert

__all__ = ["ResNeXt29", "resnext29", "resnext29_16x64d", "resnext29_8x64d", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d"]


def _fused(model, backend):
    convert(model, backend=backend)
    return model


def resnext50_32x4d(*, weights=None, progress=True, backend="auto", **kwargs):
    """torchvision's resnext50_32x4d (weights: None or a ResNeXt50_32X4D_Weights
    value), with FusedResNeXtBlock blocks running on `backend`."""
    return _fused(tv_resnet.resnext50_32x4d(weights=weights, progress=progress, **kwargs), backend)


def resnext101_32x8d(*, weights=None, progress=True, backend="auto", **kwargs):
    """torchvision's resnext101_32x8d (weights: None or a ResNeXt101_32X8D_Weights
    value), with FusedResNeXtBlock blocks running on `backend`."""
    return _fused(tv_resnet.resnext101_32x8d(weights=weights, progress=progress, **kwargs), backend)


def resnext101_64x4d(*, weights=None, progress=True, backend="auto", **kwargs):
    """torchvision's resnext101_64x4d (weights: None or a ResNeXt101_64X4D_Weights
    value), with FusedResNeXtBlock blocks running on `backend`."""
    return _fused(tv_resnet.resnext101_64x4d(weights=weights, progress=progress, **kwargs), backend)


class ResNeXt29(tv_resnet.ResNet):
    """The paper's CIFAR ResNeXt: torchvision's ResNet with a 3x3 stem (no max
    pool) and three stages (no layer4), so torchvision's forward and
    state_dict keys apply (conv1 bn1 layer1-3 fc).

    block: FusedResNeXtBlock (default) or torchvision's Bottleneck;
    blocks_per_stage: 3 for ResNeXt-29 (29 = 3 stages x 3 blocks x 3 convs + 2);
    in_channels: 3 for RGB images. Other keyword arguments (backend=...) go
    to the block.
    """

    def __init__(self, cardinality, width_per_group, *, num_classes=10, blocks_per_stage=3, in_channels=3,
                 block=FusedResNeXtBlock, norm_layer=None, **block_kwargs):
        for name, value in (("cardinality", cardinality), ("width_per_group", width_per_group),
                            ("num_classes", num_classes), ("blocks_per_stage", blocks_per_stage),
                            ("in_channels", in_channels)):
            check_positive_int(name, value)
        nn.Module.__init__(self)
        norm_layer = norm_layer or nn.BatchNorm2d
        # The attributes torchvision's ResNet._make_layer reads.
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        self.groups = cardinality
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        if block_kwargs:
            block = _with_kwargs(block, block_kwargs)
        # planes 64/128/256 (outputs 256/512/1024); width = planes/64 * d * C doubles per stage.
        self.layer1 = self._make_layer(block, 64, blocks_per_stage)
        self.layer2 = self._make_layer(block, 128, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(block, 256, blocks_per_stage, stride=2)
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(256 * tv_resnet.Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _with_kwargs(block, kwargs):
    """`block` as _make_layer calls it, with extra keyword arguments; keeps
    the class attribute `expansion` that _make_layer reads."""
    def make(*args, **more):
        return block(*args, **kwargs, **more)

    make.expansion = block.expansion
    return make


def resnext29(cardinality, width_per_group, *, num_classes=10, backend="auto", **kwargs):
    """A ResNeXt-29 (ResNeXt29) of `cardinality` groups of `width_per_group`
    channels in stage 1, with FusedResNeXtBlock blocks on `backend`."""
    return ResNeXt29(cardinality, width_per_group, num_classes=num_classes, backend=backend, **kwargs)


def resnext29_8x64d(*, num_classes=10, backend="auto", **kwargs):
    """The paper's ResNeXt-29 8x64d (34.4M parameters; 3.65% CIFAR-10 error in the paper)."""
    return resnext29(8, 64, num_classes=num_classes, backend=backend, **kwargs)


def resnext29_16x64d(*, num_classes=10, backend="auto", **kwargs):
    """The paper's ResNeXt-29 16x64d (68.2M parameters here, 68.1M in the paper; 3.58% CIFAR-10 error)."""
    return resnext29(16, 64, num_classes=num_classes, backend=backend, **kwargs)
