"""Autocast (issue 10): under torch.autocast the op casts like conv2d (to the
autocast dtype, read at run time), the block returns exactly the dtype
torchvision's Bottleneck returns in the same context with values within the
tolerance rule, the fold is made once in the autocast dtype, and an AMP
training step with torch.amp.GradScaler through a fused block in eval mode
works (and skips the step on inf/NaN gradients)."""

import pytest
import torch
from fidelity_cases import HAS_CUDA, IDENTITY_D4, PROJECTION_D3, block_input, cpu_backends, twin_blocks
from fidelity_cases import one_thread  # noqa: F401  (autouse fixture)
from helpers import Block, assert_close_to_reference

from resnext_kernels import folding
from resnext_kernels.ops import inference

# The Triton interpreter's bf16 tl.dot gives garbage (known limit, DESIGN.md
# section 6): on CPU its values are checked under fp16 autocast, bf16 only for
# the dtype; bf16 values run on the GPU (test_gpu_autocast_matches_torchvision).
INTERPRETER_DTYPE = torch.float16


def _value_dtype(backend, dtype):
    return INTERPRETER_DTYPE if backend == "triton" and not HAS_CUDA and dtype == torch.bfloat16 else dtype


def _compare_under_autocast(backend, device, dtype, cfg=PROJECTION_D3):
    """torchvision vs fused under torch.autocast(device, dtype), no_grad:
    the same output dtype (and strides), values within the tolerance rule
    against fp64 eager, when the backend can compute in `dtype` here."""
    tv, fused = twin_blocks(cfg, backend)
    tv, fused = tv.to(device), fused.to(device)
    x = block_input(cfg[0]).to(device)
    with torch.no_grad():
        with torch.autocast(device, dtype=dtype):
            expected, y = tv(x), fused(x)
        reference = tv.double()(x.double())
    assert expected.dtype == dtype  # what torchvision does, not an assumption of ours
    assert y.dtype == expected.dtype and y.stride() == expected.stride()
    if _value_dtype(backend, dtype) == dtype:
        assert_close_to_reference(y.cpu(), reference.cpu(), expected.cpu())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_autocast_matches_torchvision(backend, dtype):
    _compare_under_autocast(backend, "cpu", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_autocast_matches_torchvision(backend, dtype):
    _compare_under_autocast(backend, "cuda", dtype)


def test_autocast_dtype_is_read_at_call_time():
    """The op casts to whatever autocast dtype is active at each call (not
    one fixed at registration), and not at all outside autocast or for
    float64 (which autocast leaves alone, as for conv2d)."""
    block = Block(1, 8, 8, 8, 2, 4, 4)
    args = block.make(torch.float32)

    def run():
        return inference.bottleneck_inference(*args, stride=1, dilation=1, groups=2, backend="reference")

    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            assert run().dtype == dtype
            assert inference.compute_dtype(args[0]) == dtype
    assert run().dtype == torch.float32
    args64 = block.make(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inference.bottleneck_inference(*args64, stride=1, dilation=1, groups=2, backend="reference")
        assert y.dtype == torch.float64 and inference.compute_dtype(args64[0]) == torch.float64


def test_fold_is_made_once_in_the_autocast_dtype(monkeypatch):
    """Under autocast (no grad) the block folds its BN once, in the autocast
    dtype, and reuses the cached fold on later calls: no per-call fold or
    cast of the weights."""
    _, fused = twin_blocks(IDENTITY_D4, "reference")
    x = block_input(IDENTITY_D4[0])
    calls = []
    real = folding.fold_conv_bn
    monkeypatch.setattr(folding, "fold_conv_bn", lambda w, bn, dtype: calls.append(dtype) or real(w, bn, dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
        first = fused.folded_parameters(torch.bfloat16)
        assert calls == [torch.bfloat16] * 3
        fused(x)
        fused(x)
        assert fused.folded_parameters(torch.bfloat16) is first
    assert calls == [torch.bfloat16] * 3
    assert all(t.dtype == torch.bfloat16 for t in first if t is not None)


def _amp_step(block, x, dtype):
    """One AMP training step (autocast forward, GradScaler backward and
    step, SGD); returns (parameters before, after, the scaler, the loss)."""
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(x.device.type, init_scale=2.0**10)
    before = [p.detach().clone() for p in block.parameters()]
    with torch.autocast(x.device.type, dtype=dtype):
        loss = block(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return before, [p.detach() for p in block.parameters()], scaler, loss.detach()


def _check_amp_step(backend, device, dtype, poison):
    dtype = _value_dtype(backend, dtype)
    tv, fused = twin_blocks(PROJECTION_D3, backend)
    tv, fused = tv.to(device), fused.to(device)
    x = block_input(PROJECTION_D3[0]).to(device)
    if poison:
        x[0, 1, 2, 2] = float("nan")
    results = [_amp_step(block, x, dtype) for block in (tv, fused)]
    for (before, after, scaler, loss), name in zip(results, ("torchvision", "fused")):
        # A NaN input gives a NaN loss (a loop watching the loss sees it) and
        # NaN gradients, so GradScaler skips the step and lowers its scale.
        assert loss.isnan() == poison, f"{name}: loss {loss}"
        changed = any(not torch.equal(b, a) for b, a in zip(before, after))
        assert changed != poison, f"{name}: step {'taken' if changed else 'skipped'}"
        assert (scaler.get_scale() < 2.0**10) == poison, name
    if not poison:
        # The same update as torchvision's, to the tolerance of the AMP dtype.
        for (name, p_tv), p_fused in zip(tv.named_parameters(), fused.parameters()):
            torch.testing.assert_close(p_fused, p_tv, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nan-input"])
def test_cpu_amp_step_with_grad_scaler(request, backend, poison):
    """BN in eval mode (folded), bf16 autocast on CPU (fp16 for the Triton
    interpreter), GradScaler: the step matches torchvision's, and a NaN input
    makes both skip it."""
    _check_amp_step(backend, "cpu", torch.bfloat16, poison)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (no CUDA device)")
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nan-input"])
def test_gpu_amp_step_with_grad_scaler(backend, dtype, poison):
    _check_amp_step(backend, "cuda", dtype, poison)
