"""Hooks and pruning on a block's inner modules behave as in eager
torchvision (issue 20): the block runs its submodules one by one
(resnext_kernels/unfused.py) while any inner module carries a hook
(resnext_kernels/inner_hooks.py), says so once, and runs the fused op again
once the hooks are gone.

Every check compares a FusedResNeXtBlock with the unconverted torchvision
Bottleneck it was copied from, hooked the same way, on fresh random inputs,
in eval mode on every backend usable on CPU and in train mode on the
training backends (cuda_emulated has no training kernels). While hooked the
fused block runs the very ATen ops eager runs, on the same shapes and the
same values, so results are compared bitwise (identical code path, not two
implementations). No fused kernel runs in these tests except where the
fused path's return is checked (reference backend: cheap).
"""

import warnings

import pytest
import torch
from fidelity_cases import BLOCKS, block_input, cpu_backend_modes, torchvision_block
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from torch import nn
from torch.nn.utils import prune
from training_cases import OpRecorder

from resnext_kernels import FusedResNeXtBlock, UnfusedForwardWarning
from resnext_kernels import inner_hooks

MODES = cpu_backend_modes()
pytestmark = pytest.mark.filterwarnings("ignore::resnext_kernels.UnfusedForwardWarning")
FUSED_OPS = {"resnext_kernels.bottleneck_inference", "resnext_kernels.bottleneck_training"}


def same(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def twins(cfg, backend, train):
    tv = torchvision_block(*cfg).train(train)
    return tv, FusedResNeXtBlock.from_bottleneck(tv, backend=backend).train(train)


def run(block, x, grad):
    """Forward + backward: (out, x.grad, {param: grad}); grads zeroed first."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def assert_same_runs(got, expect, fused, tv):
    same(got[0], expect[0], "out")
    same(got[1], expect[1], "x.grad")
    assert got[2].keys() == expect[2].keys()
    for name in expect[2]:
        same(got[2][name], expect[2][name], f"{name}.grad")
    for (name, b), (_, e) in zip(fused.named_buffers(), tv.named_buffers()):
        same(b, e, name)


def hooked_step(tv, fused, cfg):
    """(fused results, eager results) of one step on a fresh input and output gradient."""
    x = block_input(cfg[0])
    with torch.no_grad():
        probe = torchvision_block(*cfg).eval()(x)  # only for the output's shape
    grad = torch.randn_like(probe)
    expect = run(tv, x, grad)
    with OpRecorder() as ops:
        got = run(fused, x, grad)
    assert not FUSED_OPS & ops.seen, f"a hooked block ran the fused op: {FUSED_OPS & ops.seen}"
    return got, expect


def record_hook(log):
    def hook(module, inputs, output):
        log.append((inputs[0].detach().clone(), output.detach().clone()))
        return output * 1.5 - 0.25  # a replacement: the block's output must change as eager's does
    return hook


@pytest.mark.parametrize("backend, train", MODES)
@pytest.mark.parametrize("site", ["conv2", "bn2", "relu", "downsample.0"])
def test_forward_hook_on_an_inner_module_sees_and_replaces_what_eager_gives(backend, train, site):
    cfg = BLOCKS["projection_d3" if site.startswith("downsample") else "identity_d4"]
    tv, fused = twins(cfg, backend, train)
    logs = {"tv": [], "fused": []}
    tv.get_submodule(site).register_forward_hook(record_hook(logs["tv"]))
    fused.get_submodule(site).register_forward_hook(record_hook(logs["fused"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got, expect = hooked_step(tv, fused, cfg)
            assert_same_runs(got, expect, fused, tv)
    unfused = [w for w in caught if issubclass(w.category, UnfusedForwardWarning)]
    assert len(unfused) == 1, [str(w.message) for w in unfused]  # once per block
    assert f"{site} (forward hook)" in str(unfused[0].message)
    assert "unfused" in str(unfused[0].message) and "resume" in str(unfused[0].message)
    assert len(logs["fused"]) == len(logs["tv"]) == 2 * (3 if site == "relu" else 1)  # relu runs 3 times a call
    for (fi, fo), (ti, to) in zip(logs["fused"], logs["tv"]):
        same(fi, ti, f"{site} hook input")
        same(fo, to, f"{site} hook output")


@pytest.mark.parametrize("backend, train", MODES)
def test_forward_pre_hook_changes_the_inner_input_as_in_eager(backend, train):
    cfg = BLOCKS["identity_d4"]
    tv, fused = twins(cfg, backend, train)
    for block in (tv, fused):
        block.conv3.register_forward_pre_hook(lambda m, inputs: (inputs[0] * 0.5 + 0.1,))
    got, expect = hooked_step(tv, fused, cfg)
    assert_same_runs(got, expect, fused, tv)
    plain = FusedResNeXtBlock.from_bottleneck(torchvision_block(*cfg), backend="reference").train(train)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():  # the pre-hook matters: without it the output differs
        assert not torch.allclose(plain(block_input(cfg[0])), fused(block_input(cfg[0])))


@pytest.mark.parametrize("backend, train", MODES)
def test_pruned_inner_convs_follow_weight_orig_as_in_eager(backend, train):
    """torch.nn.utils.prune keeps weight_orig as the parameter and recomputes
    weight = weight_orig * mask in a forward pre-hook: after an optimizer
    step on weight_orig the block uses the new pruned weight, as eager."""
    cfg = BLOCKS["projection_d3"]
    tv, fused = twins(cfg, backend, train)
    for block in (tv, fused):
        prune.l1_unstructured(block.conv1, "weight", amount=0.4)
        prune.random_unstructured(block.conv2, "weight", amount=0.3)
    fused.conv2.weight_mask.copy_(tv.conv2.weight_mask)  # random masks: make them the same
    optimizers = [torch.optim.SGD(b.parameters(), lr=0.5) for b in (tv, fused)]
    for _ in range(2):
        got, expect = hooked_step(tv, fused, cfg)
        assert_same_runs(got, expect, fused, tv)
        for opt in optimizers:
            opt.step()  # weight_orig changes; the pruned weight must be recomputed from it
    assert "conv1.weight_orig" in dict(fused.named_parameters())


@pytest.mark.parametrize("backend, train", MODES)
@pytest.mark.parametrize("kind", ["full", "legacy", "full_pre"])
def test_backward_hooks_on_inner_modules_see_eager_gradients(backend, train, kind):
    cfg = BLOCKS["identity_d4"]
    tv, fused = twins(cfg, backend, train)
    logs = {"tv": [], "fused": []}
    for name, block in (("tv", tv), ("fused", fused)):
        log = logs[name]
        if kind == "full":
            block.conv3.register_full_backward_hook(lambda m, gi, go, log=log: log.append(go[0].clone()))
        elif kind == "full_pre":
            block.conv3.register_full_backward_pre_hook(lambda m, go, log=log: (log.append(go[0].clone()),
                                                                                (go[0] * 2,))[1])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's own deprecation warning of register_backward_hook
                block.conv1.register_backward_hook(lambda m, gi, go, log=log: log.append(go[0].clone()))
    got, expect = hooked_step(tv, fused, cfg)
    assert_same_runs(got, expect, fused, tv)
    assert len(logs["fused"]) == len(logs["tv"]) == 1
    same(logs["fused"][0], logs["tv"][0], f"{kind} backward hook's grad_output")


@pytest.mark.parametrize("backend, train", MODES)
def test_a_full_backward_hook_before_an_in_place_relu_fails_as_in_eager(backend, train):
    """bn2's output is modified in place by the block's ReLU: eager refuses
    a full backward hook there, and so does the converted block."""
    cfg = BLOCKS["identity_d4"]
    for block in twins(cfg, backend, train):
        block.bn2.register_full_backward_hook(lambda *args: None)
        with pytest.raises(RuntimeError, match="BackwardHookFunction is a view and is being modified inplace"):
            block(block_input(cfg[0]))


@pytest.mark.parametrize("backend, train", MODES)
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_module_hooks_see_every_inner_module_as_in_eager(backend, train, kind):
    cfg = BLOCKS["projection_d3"]
    tv, fused = twins(cfg, backend, train)
    names = {m: n for b in (tv, fused) for n, m in b.named_modules()}
    seen = []
    register = getattr(nn.modules.module, f"register_module_{kind}_hook")
    x = block_input(cfg[0])
    with torch.no_grad():
        grad = torch.randn_like(torchvision_block(*cfg).eval()(x))
    handle = register(lambda m, *args: seen.append(names.get(m)))
    try:
        expect = run(tv, x, grad)
        eager_seen, seen[:] = list(seen), []
        got = run(fused, x, grad)
    finally:
        handle.remove()
    assert seen == eager_seen, (seen, eager_seen)  # the block itself ("") and every inner module, in order
    assert_same_runs(got, expect, fused, tv)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_fused_op_resumes_once_the_hooks_are_removed(train):
    cfg = BLOCKS["projection_d3"]
    tv, fused = twins(cfg, "reference", train)
    handles = [fused.downsample[1].register_forward_hook(lambda m, i, o: None),
               fused.conv2.register_forward_pre_hook(lambda m, i: None)]
    assert inner_hooks.hooked_submodule(fused) == "conv2 (forward pre-hook)"
    handles.pop().remove()
    assert inner_hooks.hooked_submodule(fused) == "downsample.1 (forward hook)"
    with pytest.warns(UnfusedForwardWarning, match=r"downsample\.1 \(forward hook\) is hooked"):
        got, expect = hooked_step(tv, fused, cfg)
    handles.pop().remove()
    assert inner_hooks.hooked_submodule(fused) is None
    x = block_input(cfg[0])
    with OpRecorder() as ops, warnings.catch_warnings():
        warnings.simplefilter("error", UnfusedForwardWarning)
        fused(x)
    assert FUSED_OPS & ops.seen, ops.seen
    # A submodule swapped for a hooked one is found at the next call, with no new registration in between.
    hooked_conv = nn.Conv2d(*fused.conv3.weight.shape[1::-1], 1, bias=False)
    hooked_conv.register_forward_hook(lambda m, i, o: None)
    fused(x)
    fused.conv3 = hooked_conv
    assert inner_hooks.hooked_submodule(fused) == "conv3 (forward hook)"


def test_hook_free_detection_is_cached_and_sees_every_new_registration():
    """The remembered clean scan (inner_hooks docstring) never hides a hook:
    every kind of registration on any inner module is found at the next call."""
    block = FusedResNeXtBlock.from_bottleneck(torchvision_block(*BLOCKS["projection_d3"]))
    registrations = {
        "forward hook": lambda m: m.register_forward_hook(lambda *a: None),
        "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda *a: None),
        "backward hook": lambda m: m.register_full_backward_hook(lambda *a: None),
        "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    }
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample", "downsample.0",
                 "downsample.1"):
        for kind, register in registrations.items():
            assert inner_hooks.hooked_submodule(block) is None
            handle = register(block.get_submodule(name))
            assert inner_hooks.hooked_submodule(block) == f"{name} ({kind})"
            handle.remove()
    assert inner_hooks.hooked_submodule(block) is None
