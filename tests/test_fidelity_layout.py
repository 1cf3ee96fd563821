"""The output's memory format follows the input's, like ATen's conv (issue 10):
NCHW-contiguous x gives NCHW-contiguous y, channels_last x channels_last y,
on every backend usable on CPU, through the block and the op, and the op's
fake kernel (torch.compile) reports the strides the backends write."""

import pytest
import torch
from fidelity_cases import BLOCKS, block_input, cpu_backends, twin_blocks
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from helpers import Block, assert_close_to_reference, assert_same_arithmetic

from resnext_kernels.backends import registry
from resnext_kernels.backends.reference import bottleneck_inference_reference

OP = torch.ops.resnext_kernels.bottleneck_inference.default
FORMATS = {"nchw": False, "channels_last": True}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_name", BLOCKS)
def test_block_output_has_torchvisions_strides(request, allow_tf32, backend, fmt, block_name):
    """The fused block's y has exactly the strides eager torchvision's has for
    the same x (so .view() and format-sensitive code behave the same), and
    its values are right."""
    allow_tf32(False)
    cfg = BLOCKS[block_name]
    tv, fused = twin_blocks(cfg, backend)
    x = block_input(cfg[0], channels_last=FORMATS[fmt])
    with torch.no_grad():
        expected, y = tv(x), fused(x)
        reference = tv.double()(x.double())
    assert y.stride() == expected.stride(), f"{fmt} x: y strides {y.stride()}, torchvision's {expected.stride()}"
    assert_close_to_reference(y, reference, expected)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_kernel_reports_the_real_strides(request, backend, fmt):
    """torch.library.opcheck's fake-tensor check compares the fake kernel's
    output (shape, dtype, strides) with the real kernel's, for each format."""
    block = Block(2, 12, 16, 20, 4, 5, 7, stride=2, projection=True)
    args = block.make(torch.float32, channels_last=FORMATS[fmt])
    torch.library.opcheck(OP, (*args, *block.conv, backend), test_utils=("test_faketensor",))


def test_triton_writes_nchw_y_directly(allow_tf32, poisoned_empty):
    """NCHW x through the Triton launcher, whole batch and 1-image chunks
    (batch slices of an NCHW y; K2's per-image programs, a 5x7 output of 35
    pixels in 128-pixel tiles): every element of y written (NaN-poisoned
    allocations), NCHW-contiguous, the same as the channels_last run (same
    arithmetic, only y's strides and the tiles' pixel counts differ: bitwise
    on a GPU, within BLAS's last bits on CPU, helpers.assert_same_arithmetic).
    The split path writes y as
    pixel rows and refuses an NCHW y."""
    if registry.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton unusable here: {registry.unavailable_reason('triton', 'cpu')}")
    from resnext_kernels.backends.triton import bottleneck_inference_triton

    allow_tf32(False)
    block = Block(3, 20, 16, 20, 4, 5, 7)
    args = block.make(torch.float32, channels_last=False)
    cl_args = [args[0].contiguous(memory_format=torch.channels_last), *args[1:]]
    expected = bottleneck_inference_reference(*[a.double() if a is not None else None for a in args], *block.conv)
    for chunk in (1, 3):
        y = bottleneck_inference_triton(*args, *block.conv, batch_chunk=chunk)
        y_cl = bottleneck_inference_triton(*cl_args, *block.conv, batch_chunk=chunk)
        assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last), chunk
        assert_same_arithmetic(y, y_cl, f"batch_chunk={chunk}")
        assert_close_to_reference(y, expected, bottleneck_inference_reference(*args, *block.conv))
    assert len(poisoned_empty) >= 4  # y and t1 came from the NaN-filled torch.empty
    with pytest.raises(ValueError, match="'split' writes y as pixel rows: it needs a channels_last x"):
        bottleneck_inference_triton(*args, *block.conv, strategy="split")


def test_triton_out_must_be_in_xs_format():
    if registry.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton unusable here: {registry.unavailable_reason('triton', 'cpu')}")
    from resnext_kernels.backends.triton import bottleneck_inference_triton

    block = Block(1, 16, 16, 16, 4, 3, 3)
    args = block.make(torch.float32, channels_last=False)
    out = torch.empty(1, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out must be a torch.contiguous_format"):
        bottleneck_inference_triton(*args, *block.conv, out=out)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case_index", [0, 1], ids=["identity", "projection_s2"])
def test_train_mode_output_has_torchvisions_strides(allow_tf32, poisoned_empty, backend, fmt, case_index):
    """Train mode (batch statistics, the fused training op): out in x's
    memory format as eager's, written directly (NaN-poisoned allocations:
    every element written), its values, x.grad and the parameter gradients
    right; the backward reads out and an NCHW grad_out through their strides."""
    from training_cases import CASES, F64, close, draw_input, models, step

    if registry.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(f"{backend} unusable here: {registry.unavailable_reason(backend, 'cpu')}")
    allow_tf32(False)
    case = CASES[case_index]
    ref, eager, fused = models(case, torch.float32, backend, "cpu")
    ho, wo = (case.h - 1) // case.stride + 1, (case.w - 1) // case.stride + 1
    x = draw_input(case, ref)
    grad = torch.randn(case.n, 4 * case.planes, ho, wo, dtype=F64)
    memory_format = torch.channels_last if FORMATS[fmt] else torch.contiguous_format
    expect = step(ref, x, grad, F64, "cpu", memory_format)
    base = step(eager, x, grad, torch.float32, "cpu", memory_format)
    got = step(fused, x, grad, torch.float32, "cpu", memory_format)
    assert got[0].stride() == base[0].stride(), f"{fmt} x: out strides {got[0].stride()}, torchvision's {base[0].stride()}"
    close("out", got[0], expect[0], base[0])
    close("x.grad", got[1], expect[1], base[1])
    for name in expect[2]:
        close(f"{name}.grad", got[2][name], expect[2][name], base[2][name])
