"""An empty batch (N = 0) behaves as in eager torchvision (issue 20), in
eval mode on every backend usable on CPU and in train mode on the training
backends: an empty output of the right shape and dtype in x's memory
format, BatchNorm's bookkeeping as eager leaves it (num_batches_tracked + 1
in train mode, running statistics unchanged), an empty x gradient and zero
weight gradients. H or W = 0 stays an error (tests/test_fidelity_errors.py).
The multi-process case (one rank empty, SyncBatchNorm) is in
tests/test_training_sync_bn.py.

Strides: the fused block's output follows x's memory format
(common.layout.output_memory_format, as its fake kernel says under
torch.compile); eager's ATen conv returns NCHW strides for an empty
channels_last batch. Both hold no element.
"""

import pytest
import torch
from fidelity_cases import BLOCKS, block_input, cpu_backend_modes
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from test_training_ops import BACKWARD_OP, OP, _op_args
from training_cases import TrainCase, close

from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.common.layout import output_memory_format

F64 = torch.float64
NORMS = {"m0.1": {}, "momentum-None": {"momentum": None}, "no-running-stats": {"track_running_stats": False}}


def twins(cfg, backend, train, **norm):
    """(torchvision Bottleneck in fp32 with random BN parameters and running
    stats, the fused block copied from it) in the mode asked."""
    inplanes, planes, stride, groups, base_width = cfg
    case = TrainCase(inplanes, planes, groups, base_width, 7, 5, stride=stride, **norm)
    tv = case.torchvision_block().float().train(train)
    return tv, FusedResNeXtBlock.from_bottleneck(tv, backend=backend).train(train)


def run(block, x):
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * 2).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


# Eval mode reads the running statistics only: one norm setting is enough there.
CASES = [pytest.param(*p.values, norm, marks=p.marks, id=f"{p.id}-{norm}") for p in cpu_backend_modes()
         for norm in (NORMS if p.values[1] else ["m0.1"])]


@pytest.mark.parametrize("backend, train, norm", CASES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("block", BLOCKS)
def test_an_empty_batch_gives_what_eager_gives(backend, train, norm, channels_last, block):
    cfg = BLOCKS[block]
    tv, fused = twins(cfg, backend, train, **NORMS[norm])
    x = block_input(cfg[0], n=0, hw=(7, 5), channels_last=channels_last)
    expect, got = run(tv, x), run(fused, x)
    y, y_eager = got[0], expect[0]
    assert y.shape == y_eager.shape and y.dtype == y_eager.dtype and y.device == y_eager.device
    assert y.stride() == torch.empty(y.shape, memory_format=output_memory_format(x)).stride()
    assert got[1].shape == expect[1].shape == x.shape
    assert got[2].keys() == expect[2].keys()
    for name, g in expect[2].items():
        assert got[2][name] is not None and got[2][name].shape == g.shape, name
        torch.testing.assert_close(got[2][name], g, rtol=0, atol=0, msg=f"{name}.grad")  # zeros, both
    for (name, b), (_, e) in zip(fused.named_buffers(), tv.named_buffers()):
        torch.testing.assert_close(b, e, rtol=0, atol=0, msg=name)
    if norm != "no-running-stats":  # eager's bookkeeping, compared above: + 1 in train mode only
        assert fused.bn1.num_batches_tracked.item() == int(train)


@pytest.mark.parametrize("backend, train", [p for p in cpu_backend_modes() if p.values[1]])
def test_training_goes_on_as_in_eager_after_an_empty_batch(backend, train):
    """momentum=None averages over num_batches_tracked, which counts the
    empty batch (as eager's): the next, non-empty step's running statistics
    match eager's (fp64 reference, eager fp32 sets the tolerance)."""
    cfg = BLOCKS["identity_d4"]
    ref, fused = twins(cfg, backend, train, momentum=None)
    ref = ref.to(F64)
    eager = twins(cfg, backend, train, momentum=None)[0]
    eager.load_state_dict(ref.state_dict())
    for n in (0, 2):
        x = block_input(cfg[0], n=n, hw=(5, 5), dtype=F64)
        with torch.no_grad():
            ref(x)
            eager(x.float())
            fused(x.float())
    assert fused.bn1.num_batches_tracked.item() == ref.bn1.num_batches_tracked.item() == 2
    for (name, r), (_, e), (_, f) in zip(ref.named_buffers(), eager.named_buffers(), fused.named_buffers()):
        if not name.endswith("num_batches_tracked"):
            close(name, f, r, e)


@pytest.mark.parametrize("backend, train", [p for p in cpu_backend_modes() if p.values[1]])
def test_the_ops_pass_opcheck_on_an_empty_batch(backend, train):
    """The real kernels' empty outputs (ops/empty_batch.py, the inference
    op's early return) agree with the fake kernels in shape, dtype and
    strides, and their autograd registration holds (torch.library.opcheck)."""
    name = backend
    case = TrainCase(16, 4, 2, 64, 5, 5, stride=2, n=0)  # projection
    args = _op_args(case, torch.float32, name, requires_grad=True)
    torch.library.opcheck(OP, args)
    with torch.no_grad():
        out, y1, y2, y3, yd, bn_stats, _ = OP(*args)
    x, w1, w2, w3, wd = (t.detach() for t in args[:5])
    affine = [t.detach() for i in range(4) for t in args[5 + 4 * i:7 + 4 * i]]
    torch.library.opcheck(BACKWARD_OP, (torch.randn_like(out), x, w1, w2, w3, wd, out, y1, y2, y3, yd, bn_stats,
                                        *affine, case.stride, case.dilation, case.groups, [True] * 4, True, name))
    tv = case.torchvision_block().float().eval()
    folded = FusedResNeXtBlock.from_bottleneck(tv).folded_parameters(torch.float32)
    inference_args = (x.requires_grad_(True), *(t.detach().requires_grad_(True) for t in folded), 2, 1, 2, name)
    torch.library.opcheck(torch.ops.resnext_kernels.bottleneck_inference.default, inference_args)
