"""End to end (issue 22): a torchvision Faster R-CNN with an FPN over a
converted ResNeXt backbone with FrozenBatchNorm2d, as torchvision's
detection builders make it (stem and layer1 frozen, trainable_layers=3),
trains like the unconverted model. CPU, reference backend, float64 (the
fold is then the only difference between the two, so the library's float64
tolerance applies), random weights, tiny images.
"""

import copy

import torch
from helpers import randomize_norms
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d
from training_cases import OpRecorder

import resnext_kernels as rk

F64 = torch.float64


def detector():
    """fasterrcnn_resnet50_fpn's construction with a small ResNeXt (one 4x4d
    block per stage) and small sampling batches."""
    body = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(randomize_norms(body), trainable_layers=3)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_batch_size_per_image=32,
                      box_batch_size_per_image=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50).to(F64)


def train_step(model, images, targets, seed):
    """(losses, {backbone parameter name: grad}) of one training step; the
    samplers' randomness replayed from `seed`."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = model([i.clone() for i in images], copy.deepcopy(targets))
    sum(losses.values()).backward()
    return losses, {n: p.grad for n, p in model.backbone.body.named_parameters()}


def test_faster_rcnn_with_converted_frozen_bn_backbone_trains_like_torchvision():
    eager = detector()
    fused = rk.convert(copy.deepcopy(eager), backend="reference")
    blocks = [m for m in fused.modules() if isinstance(m, rk.FusedResNeXtBlock)]
    assert len(blocks) == 4
    images = [torch.rand(3, 64, 64, dtype=F64), torch.rand(3, 48, 64, dtype=F64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]], dtype=F64),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0]], dtype=F64), "labels": torch.tensor([2])}]
    seed = int(torch.randint(2**31, (1,)))

    expect_losses, expect_grads = train_step(eager, images, targets, seed)
    with OpRecorder() as ops:
        losses, grads = train_step(fused, images, targets, seed)
    # FrozenBatchNorm2d blocks run the inference op in train mode, forward and backward.
    assert ops.counts["resnext_kernels.bottleneck_inference"] == 4
    assert "resnext_kernels.bottleneck_training" not in ops.seen

    assert losses.keys() == expect_losses.keys()
    for name, value in expect_losses.items():
        torch.testing.assert_close(losses[name], value, msg=lambda m, name=name: f"{name}: {m}")
    assert grads.keys() == expect_grads.keys()
    trainable = [n for n, g in expect_grads.items() if g is not None]
    assert trainable and all(n.startswith(("layer2", "layer3", "layer4")) for n in trainable)
    for name, g in expect_grads.items():
        assert (grads[name] is None) == (g is None), name
        if g is not None:
            assert g.abs().max() > 0, name
            torch.testing.assert_close(grads[name], g, msg=lambda m, name=name: f"{name}.grad: {m}")
