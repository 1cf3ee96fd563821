"""NaN and inf propagate exactly as in eager torchvision, forward and
backward, on every backend usable on CPU (issue 10).

A poisoned input or weight must give the same non-finite output positions,
and the same values there (NaN, +inf or -inf), as eager PyTorch: ReLU of
NaN is NaN, ReLU's gradient is torch's threshold_backward, and the Triton
packing's zeros (padded channels, the block-diagonal grouped-conv tiles)
never meet an inf or NaN from a channel they do not belong to.

The 3x3 weight is poisoned at its centre tap only: that tap never reads the
zero padding, and eager PyTorch itself disagrees with itself about a
non-finite weight meeting the padding (measured, torch 2.14 CPU: the oneDNN
fp32/bf16 convs skip padded taps, the fp64/fp16 im2col path multiplies them,
0 * inf = NaN; the Triton kernels multiply). The same holds backward: an
infinite gradient (from an infinite conv3 weight) meets the padding in the
3x3's weight gradient; where eager's fp32 and fp64 non-finite patterns of
a gradient differ, the fused one must equal one of them (seen: the Triton
backward's conv2.weight.grad equals eager fp64's, seed 229023317).
"""

import pytest
import torch
from fidelity_cases import BLOCKS, block_input, cpu_backends, torchvision_block
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from helpers import Block, assert_close_to_reference

from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.backends import registry
from resnext_kernels.backends.reference import bottleneck_inference_reference
from resnext_kernels.ops import inference

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def pattern(t):
    """Per element: 0 finite, 2 NaN, +3 / -3 for +inf / -inf."""
    return torch.where(t.isnan(), 2, torch.where(t.isinf(), t.sign().to(torch.int64) * 3, 0))


def assert_same_nonfinite(actual, expected, what, values=True):
    """The same non-finite positions (and, with `values`, the same NaN / +inf / -inf there)."""
    if values:
        same = torch.equal(pattern(actual), pattern(expected))
    else:
        same = torch.equal(actual.isfinite(), expected.isfinite())
    assert same, (f"{what}: non-finite {(~actual.isfinite()).sum().item()} (NaN {actual.isnan().sum().item()}) "
                  f"vs eager {(~expected.isfinite()).sum().item()} (NaN {expected.isnan().sum().item()})")


def poison(tv, x, site, value):
    """Put `value` into x (two elements) or one element of a parameter of torchvision block `tv`, in place."""
    with torch.no_grad():
        if site == "x":
            x[0, 3, 2, 4] = value
            x[1, 5, 5, 1] = value
        elif site == "conv2.weight":
            tv.conv2.weight[1, 2, 1, 1] = value  # the centre tap (module docstring)
        else:
            tv.get_parameter(site).view(-1)[5] = value


# (block, site, kinds): NaN everywhere; +inf and -inf where they take
# different routes (ReLU turns -inf into 0: -inf in bn1's bias reaches
# nothing, a check that it stays 0).
CASES = [
    ("identity_d4", "x", ("nan", "+inf", "-inf")),
    ("identity_d4", "conv1.weight", ("nan", "+inf")),
    ("identity_d4", "conv2.weight", ("nan", "-inf")),
    ("identity_d4", "conv3.weight", ("nan",)),
    ("identity_d4", "bn1.bias", ("nan", "+inf", "-inf")),
    ("projection_d3", "x", ("nan", "+inf")),
    ("projection_d3", "conv1.weight", ("nan", "-inf")),
    ("projection_d3", "conv2.weight", ("nan",)),
    ("projection_d3", "conv3.weight", ("nan", "+inf")),
    ("projection_d3", "downsample.0.weight", ("nan", "+inf", "-inf")),
]


def _run(block, x, grad):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad, {name: p.grad for name, p in block.named_parameters()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("block_name,site,kind",
                         [pytest.param(b, s, k, id=f"{b}-{s}-{k}") for b, s, kinds in CASES for k in kinds])
def test_poisoned_block_matches_torchvision(request, allow_tf32, backend, block_name, site, kind):
    """Forward and backward through a fused block and its torchvision twin
    with one kind of poison in one place: the same NaN/+inf/-inf at the same
    positions of y, x.grad and every parameter's grad; finite values of y
    within the tolerance rule (fp64 eager as the reference, TF32 off)."""
    allow_tf32(False)
    cfg = BLOCKS[block_name]
    tv = torchvision_block(*cfg)
    x = block_input(cfg[0])
    poison(tv, x, site, VALUES[kind])
    fused = FusedResNeXtBlock.from_bottleneck(tv, backend=backend).eval()

    grad = torch.randn_like(tv(x))
    expected = _run(tv, x, grad)
    if kind == "nan":
        assert expected[0].isnan().any(), "a NaN input or weight reaches eager's y"
    got = _run(fused, x, grad)
    eager64 = _run(tv.double(), x.double(), grad.double())

    # Eager agrees with itself about these poisons (fp64 and fp32 paths).
    assert_same_nonfinite(eager64[0], expected[0], "eager fp64 vs fp32 y")
    assert_same_nonfinite(got[0], expected[0], "y")
    finite = expected[0].isfinite()
    if finite.any():
        assert_close_to_reference(got[0][finite], eager64[0][finite], expected[0][finite])
    assert_same_nonfinite(got[1], expected[1], "x.grad")
    for name, g in expected[2].items():
        # BN's weight (gamma) gets its gradient through the fold w * gamma /
        # sqrt(var + eps): where the conv weight is +-inf that is one +-inf
        # product, where eager's sum(grad * xhat) over +-inf and -inf xhat is
        # NaN. Same positions; the values are compared for everything else.
        bn_weight = name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight"))
        values = not (bn_weight and kind != "nan")
        if values and not torch.equal(pattern(g), pattern(eager64[2][name])):
            # Eager disagrees with itself (module docstring: an infinite
            # gradient meeting the 3x3's zero padding in the weight gradient,
            # skipped by oneDNN fp32, multiplied by the fp64 path): either is eager's.
            same_as_64 = torch.equal(pattern(got[2][name]), pattern(eager64[2][name]))
            assert same_as_64 or torch.equal(pattern(got[2][name]), pattern(g)), f"{name}.grad: neither eager's"
            continue
        assert_same_nonfinite(got[2][name], g, f"{name}.grad", values=values)


# Op-level cases where the packing of the Triton kernels (and any kernel that
# pads or tiles groups) could let an inf reach channels it does not belong to:
# several groups per 16-channel tile (d = 4, 8), groups padded to a power of
# two (d = 3, 24), a padding group in the last tile (3 groups of 4).
GROUP_BLOCKS = [
    Block(2, 16, 16, 16, 4, 5, 6),                            # d=4: 4 groups per tile
    Block(2, 12, 24, 20, 3, 5, 5, projection=True),           # d=8: 2 groups per tile, 3 groups
    Block(2, 12, 12, 20, 4, 7, 5, stride=2, projection=True),  # d=3 -> 4 padded
    Block(1, 24, 48, 24, 2, 5, 5),                            # d=24 -> 32 padded, one group per tile
    Block(1, 12, 12, 12, 3, 5, 5, dilation=2),                # d=4, 3 groups: a padding group
]


def one_group_inf(block):
    """Op arguments (fp32) where +inf at one pixel of x reaches exactly one
    t1 channel c: x[0, k, 1, 1] = +inf with w1[:, k] <= 0 except w1[c, k] > 0
    (relu(-inf) = 0 elsewhere). c's group's w2 is positive, so its t2 is +inf
    around that pixel, and conv3 rows 0 / 1 / 2 meet those channels with
    negative / positive / mixed weights: y there is 0 / +inf / NaN in eager.
    A kernel whose zeros (packing) multiply the inf gives NaN at the zeros."""
    x, w1, b1, w2, b2, w3, b3, wd, bd = block.make(torch.float32)
    d = block.width // block.groups
    k, c = 1, d + 1 if block.groups > 1 and d > 1 else 0
    g = c // d
    with torch.no_grad():
        x[0, k, 1, 1] = float("inf")
        w1[:, k] = -w1[:, k].abs()
        w1[c, k] = w1[c, k].abs()
        w2[g * d:(g + 1) * d] = w2[g * d:(g + 1) * d].abs()
        w3g = w3[:3, g * d:(g + 1) * d, 0, 0]  # a view: conv3 rows 0-2, c's group's columns
        w3g[0] = -w3g[0].abs()
        w3g[1] = w3g[1].abs()
        w3g[2] = w3g[2].abs() * torch.tensor([1.0, -1.0]).repeat(d)[:d]
    return [x, w1, b1, w2, b2, w3, b3, wd, bd]


def _assert_group_case(y, eager):
    # The premise: where row 1 sees the group's +inf, row 0 is a finite 0
    # (the zeros of a packing would make it NaN), and row 2 has a NaN.
    assert (eager[0, 1].isinf() & eager[0, 0].isfinite()).any() and eager[0, 2].isnan().any(), "the case's premise"
    assert_same_nonfinite(y, eager, "y")
    finite = eager.isfinite()
    torch.testing.assert_close(y[finite], eager[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("block", GROUP_BLOCKS, ids=repr)
def test_inf_stays_in_its_group(backend, block, allow_tf32):
    allow_tf32(False)
    args = one_group_inf(block)
    eager = bottleneck_inference_reference(*args, *block.conv)
    y = inference.bottleneck_inference(*args, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                       backend=backend)
    _assert_group_case(y, eager)


@pytest.mark.parametrize("block", [b for b in GROUP_BLOCKS if not b.projection], ids=repr)
def test_inf_stays_in_its_group_on_the_triton_split_path(block, allow_tf32):
    """The same on the Triton split path (K2a writes t2; identity blocks only)."""
    if registry.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton unusable here: {registry.unavailable_reason('triton', 'cpu')}")
    from resnext_kernels.backends.triton import bottleneck_inference_triton

    allow_tf32(False)
    args = one_group_inf(block)
    eager = bottleneck_inference_reference(*args, *block.conv)
    _assert_group_case(bottleneck_inference_triton(*args, *block.conv, strategy="split"), eager)


@pytest.mark.parametrize("precision", ["tf32", "float16", "bfloat16"])
@pytest.mark.parametrize("block", [b for b in GROUP_BLOCKS if b.width // b.groups < 8], ids=repr)
def test_inf_stays_in_its_group_on_cuda_tensor_cores(block, precision, allow_tf32):
    """The CUDA kernel's block-diagonal tiles (d < 8) on its tensor-core
    paths (emulated per lane): a tile that comes out with a NaN is
    recomputed group by group (the fp32 test above covers the CUDA-core path)."""
    if registry.unavailable_reason("cuda_emulated", "cpu") is not None:
        pytest.skip(f"cuda_emulated unusable here: {registry.unavailable_reason('cuda_emulated', 'cpu')}")
    allow_tf32(precision == "tf32")
    dtype = torch.float32 if precision == "tf32" else getattr(torch, precision)
    args = [None if a is None else a.to(dtype) for a in one_group_inf(block)]
    eager = bottleneck_inference_reference(*[None if a is None else a.float() for a in args], *block.conv)
    y = inference.bottleneck_inference(*args, stride=block.stride, dilation=block.dilation, groups=block.groups,
                                       backend="cuda_emulated").float()
    assert (eager[0, 1].isinf() & eager[0, 0].isfinite()).any() and eager[0, 2].isnan().any(), "the case's premise"
    assert_same_nonfinite(y, eager, "y")
    finite = eager.isfinite()
    torch.testing.assert_close(y[finite], eager[finite], rtol=5e-2, atol=5e-2)
